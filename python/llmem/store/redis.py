"""A state store on a Redis server, shared by every process that reaches it (``pip install
llmem[redis]``: the ``redis`` client from PyPI).

Publication is atomic. A value up to ``chunk_bytes`` is one ``SET``, which Redis applies whole
or not at all (a client killed while sending it leaves nothing). A larger value is written in
chunks under a temporary key (``SET`` then ``APPEND``\\ s, the key expiring after
``temp_ttl`` seconds, so a killed writer's part disappears by itself) and published by a
``MULTI``/``RENAME``/``EXPIRE``/``EXEC`` transaction: no reader ever sees part of a value under
its key.

Outages: the client's socket timeouts are small (``socket_timeout``, default 0.25 s) and redis-py's
own retries are off. When a call fails the store counts it, logs one warning on the ``"llmem"``
logger, and for ``backoff`` seconds (doubling up to ``max_backoff``) answers every call "not
there" / "not written" without touching the network; then the next call tries again (the client
reconnects) and, on success, logs that the store is back. Serving never waits longer than one
timeout per backoff period.

Bounds: each value may expire (``ttl`` seconds, default none); the server's memory is bounded
by its own ``maxmemory`` with an eviction policy (``allkeys-lru`` for a cache: Redis then drops
the least recently used prefixes itself). Values larger than ``max_value_bytes`` are not stored.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, List, Optional, Sequence

from .base import StateStore

__all__ = ["RedisStore"]

log: logging.Logger = logging.getLogger("llmem")


class RedisStore(StateStore):
    """Values on a Redis server.

    Give ``url`` (``redis://host:port/db``, ``unix:///path/to/socket``), or ``host``/``port``,
    or ``unix_socket_path``, or a ready ``client`` (a ``redis.Redis``; its own timeouts and
    retries then apply).
    """

    def __init__(self, url: Optional[str] = None, *, host: str = "127.0.0.1", port: int = 6379,
                 unix_socket_path: Optional[str] = None, db: int = 0, client: Any = None,
                 ttl: Optional[float] = None, socket_timeout: float = 0.25, connect_timeout: float = 0.25,
                 backoff: float = 0.1, max_backoff: float = 5.0, chunk_bytes: int = 64 << 20,
                 max_value_bytes: int = 512 << 20, temp_ttl: float = 60.0) -> None:
        super().__init__()
        try:
            import redis as redis_module
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise ImportError("RedisStore needs the redis client: pip install 'llmem[redis]'") from exc
        for name, value in (("socket_timeout", socket_timeout), ("connect_timeout", connect_timeout),
                            ("backoff", backoff), ("max_backoff", max_backoff), ("temp_ttl", temp_ttl)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not ttl > 0):
            raise ValueError(f"ttl must be None or a positive number of seconds, got {ttl!r}")
        for name, value in (("chunk_bytes", chunk_bytes), ("max_value_bytes", max_value_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self._errors = redis_module.RedisError
        if client is None:
            common: dict[str, Any] = dict(socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                                          retry=Retry(NoBackoff(), 0))
            if url is not None:
                client = redis_module.Redis.from_url(url, **common)
            elif unix_socket_path is not None:
                client = redis_module.Redis(unix_socket_path=unix_socket_path, db=db, **common)
            else:
                client = redis_module.Redis(host=host, port=port, db=db, **common)
        self.client: Any = client
        self.ttl_ms: Optional[int] = None if ttl is None else max(1, int(ttl * 1000))
        self.chunk_bytes: int = chunk_bytes
        self.max_value_bytes: int = max_value_bytes
        self.temp_ttl_ms: int = max(1, int(temp_ttl * 1000))
        self.backoff: float = float(backoff)
        self.max_backoff: float = float(max_backoff)
        self._state_lock = threading.Lock()
        self._down_until = 0.0   # monotonic time before which nothing is tried
        self._delay = 0.0        # the current backoff (0: up)
        self.outages: int = 0         # times the server went from up to down

    def __repr__(self) -> str:
        return f"RedisStore({self.client!r}, ttl_ms={self.ttl_ms})"

    # -- the outage state --------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """False while the store is backing off after a failure."""
        with self._state_lock:
            return self._delay == 0.0

    def _available(self) -> bool:
        with self._state_lock:
            return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        self._count("errors")
        with self._state_lock:
            first = self._delay == 0.0
            self._delay = self.backoff if first else min(self.max_backoff, 2 * self._delay)
            self._down_until = time.monotonic() + self._delay
            delay = self._delay
            if first:
                self.outages += 1
        if first:
            log.warning("llmem store: Redis %s failed (%s: %s); serving without the store tier, retrying in "
                        "%.2fs with backoff", what, type(exc).__name__, exc, delay)
        else:
            log.debug("llmem store: Redis still unreachable (%s); next try in %.2fs", type(exc).__name__, delay)

    def _ok(self) -> None:
        with self._state_lock:
            if self._delay == 0.0:
                return
            self._delay = 0.0
            self._down_until = 0.0
        log.warning("llmem store: Redis is reachable again; the store tier is back")

    # -- the byte operations -----------------------------------------------------------------------

    def _put(self, key: str, value: memoryview) -> bool:
        if len(value) > self.max_value_bytes:
            return False
        if len(value) <= self.chunk_bytes:
            self.client.set(key, value, px=self.ttl_ms)
            self._ok()
            return True
        temp = f"{key}:tmp:{os.getpid()}:{threading.get_ident()}:{time.monotonic_ns()}"
        self.client.set(temp, value[:self.chunk_bytes], px=self.temp_ttl_ms)
        for at in range(self.chunk_bytes, len(value), self.chunk_bytes):
            self.client.append(temp, value[at:at + self.chunk_bytes])
        pipe = self.client.pipeline(transaction=True)
        pipe.rename(temp, key)
        if self.ttl_ms is None:
            pipe.persist(key)
        else:
            pipe.pexpire(key, self.ttl_ms)
        pipe.execute()
        self._ok()
        return True

    def _get(self, key: str) -> Optional[bytes]:
        value = self.client.get(key)
        self._ok()
        return None if value is None else bytes(value)

    def _delete(self, key: str) -> None:
        self.client.delete(key)
        self._ok()

    def _exists(self, keys: Sequence[str]) -> List[bool]:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        out = [bool(x) for x in pipe.execute()]
        self._ok()
        return out

    def ping(self) -> bool:
        """Whether the server answers now (tries even while backing off)."""
        try:
            ok = bool(self.client.ping())
        except self._errors as exc:
            self._failed("ping", exc)
            return False
        self._ok()
        return ok

    def close(self) -> None:
        try:
            self.client.close()
        except self._errors:  # pragma: no cover - closing a dead connection
            pass
