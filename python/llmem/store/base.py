"""The interface every state store backend implements, and what llmem keeps in it.

A stored value is an *envelope* around a memory's headered state bytes
(``memory.state_write(seq_id, STATE_HEADER)``)::

    magic "LLMSTORE" | u32 version | u32 reserved | u64 n_tokens | 16-byte digest of the key | state

The digest ties the value to its key (a value copied or written under another key is refused);
the state's own versioned header ties it to the memory kind and configuration and carries CRC-32s
of the bytes (a value that does not fit the reading memory, or a corrupt one, is refused). A
refused value is deleted from the store and the caller recomputes.

Backends (``MemoryStore``, ``DiskStore``, ``RedisStore``) implement four byte operations; this
class adds the checks, the counters and the sequence hand-over. Every operation that touches the
store catches the backend's failures (a full disk, Redis down): it logs on the ``"llmem"`` logger,
counts an error and answers "not there" / "not written", so serving goes on without the tier.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import struct
import threading
from typing import Dict, List, Optional, Sequence, Tuple, TypedDict, cast

from ..errors import StateError
from ..memory import STATE_HEADER, Memory, as_byte_view

__all__ = ["StateStore", "StoreStats", "ENVELOPE_MAGIC", "pack_value", "unpack_value"]

log: logging.Logger = logging.getLogger("llmem")

ENVELOPE_MAGIC = b"LLMSTORE"
_ENVELOPE = struct.Struct("<8sIIQ16s")
_VERSION = 1


class StoreStats(TypedDict):
    """What :meth:`StateStore.stats` returns (counters since the store was made, and the bytes
    it holds now where the backend knows them; -1 where it does not)."""

    puts: int
    put_bytes: int
    put_failed: int
    gets: int
    hits: int
    misses: int
    get_bytes: int
    refused: int
    errors: int
    evictions: int
    held_bytes: int
    held_values: int


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def pack_value(key: str, state: bytes, n_tokens: int) -> bytes:
    """The stored value of ``state`` (headered state bytes) under ``key``."""
    return _ENVELOPE.pack(ENVELOPE_MAGIC, _VERSION, 0, n_tokens, _digest(key)) + state


def unpack_value(key: str, value: bytes) -> Tuple[int, memoryview]:
    """(n_tokens, headered state) of a stored value; StateError ``CORRUPT`` when the value is not
    an envelope of this version written under ``key``."""
    view = as_byte_view(value)
    if len(view) < _ENVELOPE.size:
        raise StateError(f"stored value of {len(view)} bytes is shorter than its envelope", "CORRUPT")
    magic, version, _, n_tokens, digest = _ENVELOPE.unpack_from(view, 0)
    if magic != ENVELOPE_MAGIC:
        raise StateError("stored value is not an llmem store envelope", "CORRUPT")
    if version != _VERSION:
        raise StateError(f"stored value of envelope version {version}, this llmem reads {_VERSION}", "CORRUPT")
    if digest != _digest(key):
        raise StateError(f"stored value under {key!r} was written for another key", "CORRUPT")
    return int(n_tokens), view[_ENVELOPE.size:]


def check_key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a store key must be a str, not {type(key).__name__}")
    if not key or len(key) > 1024 or any(c in key for c in "\0\n\r"):
        raise ValueError(f"a store key must be 1..1024 characters without NUL or line breaks, got {key!r}")
    return key


class StateStore(abc.ABC):
    """A shared store of sequence states: the byte operations of a backend plus llmem's checks.

    Use a backend: :class:`~llmem.store.MemoryStore` (this process, bounded by bytes, LRU),
    :class:`~llmem.store.DiskStore` (a local directory, atomic files, bounded by bytes) or
    :class:`~llmem.store.RedisStore` (a Redis server shared by many processes). Every method is
    thread-safe.
    """

    def __init__(self) -> None:
        self._stats_lock = threading.Lock()
        self._counts: Dict[str, int] = {k: 0 for k in ("puts", "put_bytes", "put_failed", "gets", "hits", "misses",
                                                        "get_bytes", "refused", "errors", "evictions")}

    # -- what a backend implements -----------------------------------------------------------------

    @abc.abstractmethod
    def _put(self, key: str, value: memoryview) -> bool:
        """Publish ``value`` (a flat byte view: copy it if kept) under ``key`` atomically (readers see the old value, none, or all of
        the new one); False when refused (too large). Raises on a backend failure."""

    @abc.abstractmethod
    def _get(self, key: str) -> Optional[bytes]:
        """The value under ``key`` or None. Raises on a backend failure."""

    @abc.abstractmethod
    def _delete(self, key: str) -> None:
        """Remove ``key`` (nothing when absent). Raises on a backend failure."""

    @abc.abstractmethod
    def _exists(self, keys: Sequence[str]) -> List[bool]:
        """Which of ``keys`` hold a value (one round trip where the backend has them). Raises
        on a backend failure."""

    def _held(self) -> Tuple[int, int]:
        """(bytes, values) held now; (-1, -1) where unknown."""
        return -1, -1

    def _available(self) -> bool:
        """False while the backend is known to be unreachable (then nothing is tried)."""
        return True

    def _failed(self, what: str, exc: BaseException) -> None:
        """A backend call raised: count and log it (backends also note the outage)."""
        self._count("errors")
        log.warning("llmem store %s: %s failed: %s: %s", type(self).__name__, what, type(exc).__name__, exc)

    # -- bytes ---------------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counts[name] += n

    def put(self, key: str, value: "bytes | bytearray | memoryview") -> bool:
        """Store ``value`` (bytes-like) under ``key``; True when written. A backend failure is
        logged and counted, and answers False."""
        check_key(key)
        data = as_byte_view(value)  # not copied: the backend copies what it keeps
        if not self._available():
            self._count("put_failed")
            return False
        try:
            ok = self._put(key, data)
        except Exception as exc:  # the backend's own errors: the tier is optional
            self._failed("put", exc)
            ok = False
        if ok:
            self._count("puts")
            self._count("put_bytes", len(data))
        else:
            self._count("put_failed")
        return ok

    def get(self, key: str) -> Optional[bytes]:
        """The value under ``key``, or None (absent, or the backend failed: logged, counted)."""
        check_key(key)
        self._count("gets")
        value: Optional[bytes] = None
        if self._available():
            try:
                value = self._get(key)
            except Exception as exc:
                self._failed("get", exc)
        if value is None:
            self._count("misses")
        else:
            self._count("hits")
            self._count("get_bytes", len(value))
        return value

    def delete(self, key: str) -> None:
        """Remove ``key`` (a backend failure is logged and counted)."""
        check_key(key)
        if not self._available():
            return
        try:
            self._delete(key)
        except Exception as exc:
            self._failed("delete", exc)

    def contains(self, keys: Sequence[str]) -> List[bool]:
        """Which of ``keys`` hold a value now (all False when the backend fails)."""
        keys = [check_key(k) for k in keys]
        if not keys or not self._available():
            return [False] * len(keys)
        try:
            return self._exists(keys)
        except Exception as exc:
            self._failed("exists", exc)
            return [False] * len(keys)

    def stats(self) -> StoreStats:
        """Counters: ``puts``/``put_bytes`` written, ``put_failed`` (refused, backend down or
        failing), ``gets`` = ``hits`` + ``misses``, ``get_bytes`` read, ``refused`` values
        (corrupt, foreign, not fitting the memory: deleted), ``errors`` (backend failures),
        ``evictions`` (values the store's own bound removed), ``held_bytes``/``held_values``
        now (-1 when the backend does not say)."""
        with self._stats_lock:
            out: Dict[str, int] = dict(self._counts)
        out["held_bytes"], out["held_values"] = self._held()
        return cast(StoreStats, out)

    def close(self) -> None:
        """Release the backend's resources (connections); the store is unusable afterwards."""

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sequences -------------------------------------------------------------------------------------

    def put_sequence(self, memory: Memory, seq_id: int, key: str, n_tokens: Optional[int] = None) -> bool:
        """Store sequence ``seq_id`` of ``memory`` under ``key`` (to finish it elsewhere, or to
        preempt it to a slower tier): its state bytes with llmem's versioned header, in an
        envelope that records ``n_tokens`` (default: the sequence's length,
        ``seq_pos_max + 1``). True when written. The memory is only read."""
        check_key(key)
        from ..kv_cache import KVCache, KVCacheISWA

        head = _ENVELOPE.size
        with memory.lock:
            if isinstance(memory, (KVCache, KVCacheISWA)):
                # the KV caches count their bytes without writing them: the envelope and the
                # state go into one buffer, the state written once, in place
                buf = bytearray(head + memory.state_size(seq_id, STATE_HEADER))
                n = memory.state_write_into(memoryview(buf)[head:], seq_id, STATE_HEADER)
            else:  # (the others write the state to measure it: write it once and copy it)
                state = memory.state_write(seq_id, STATE_HEADER)
                n = len(state)
                buf = bytearray(head + n)
                buf[head:] = state
            if n_tokens is None:
                n_tokens = memory.seq_pos_max(seq_id) + 1
        _ENVELOPE.pack_into(buf, 0, ENVELOPE_MAGIC, _VERSION, 0, int(n_tokens), _digest(key))
        return self.put(key, memoryview(buf)[:head + n])

    def get_sequence(self, memory: Memory, seq_id: int, key: str) -> Optional[int]:
        """Restore the sequence stored under ``key`` into ``seq_id`` of ``memory`` (replacing
        what it held) and return its ``n_tokens``; None when the key holds nothing, the store
        failed, or the value was refused: a corrupt value, one written under another key, or
        the state of another memory kind or configuration is deleted from the store, logged,
        and ``seq_id`` is left exactly as it was, so the caller recomputes."""
        value = self.get(key)
        if value is None:
            return None
        return self.restore(memory, seq_id, key, value)

    def restore(self, memory: Memory, seq_id: int, key: str, value: bytes) -> Optional[int]:
        """:meth:`get_sequence` for a value already fetched."""
        try:
            n_tokens, state = unpack_value(key, value)
            memory.state_read(state, seq_id, STATE_HEADER)  # type: ignore[arg-type]  # any bytes-like object
        except StateError as exc:
            self.refuse(key, exc)
            return None
        return n_tokens

    def refuse(self, key: str, exc: BaseException) -> None:
        """Count, log and delete a value that cannot be used."""
        self._count("refused")
        log.warning("llmem store %s: refused the value under %r and deleted it: %s", type(self).__name__, key, exc)
        self.delete(key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

