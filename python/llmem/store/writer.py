"""Asynchronous write-back: a background thread puts values into a store, so the caller (a decode
loop) never waits on the network or the disk.

The queue is bounded by values and by bytes; a value that does not fit is dropped and counted
(a cache may always lose a write: the prefix is recomputed on a later miss).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Deque, Dict, Optional, Tuple, TypedDict

from .base import StateStore, check_key

__all__ = ["AsyncWriter", "WriterStats"]

log: logging.Logger = logging.getLogger("llmem")


class WriterStats(TypedDict):
    """What :meth:`AsyncWriter.stats` returns."""

    submitted: int
    written: int
    failed: int
    dropped: int
    queued: int
    queued_bytes: int


class AsyncWriter:
    """Puts values into ``store`` from one daemon thread; at most ``max_queue`` values and
    ``max_queue_bytes`` bytes wait at a time."""

    def __init__(self, store: StateStore, max_queue: int = 64, max_queue_bytes: int = 256 << 20) -> None:
        if not isinstance(store, StateStore):
            raise TypeError(f"store must be a StateStore, not {type(store).__name__}")
        for name, value in (("max_queue", max_queue), ("max_queue_bytes", max_queue_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.store: StateStore = store
        self.max_queue: int = max_queue
        self.max_queue_bytes: int = max_queue_bytes
        self._queue: Deque[Tuple[str, bytes]] = collections.deque()
        self._bytes = 0
        self._busy = 0  # values taken off the queue and being written
        self._cond = threading.Condition()
        self._closed = False
        self._counts: Dict[str, int] = {"submitted": 0, "written": 0, "failed": 0, "dropped": 0}
        self._thread = threading.Thread(target=self._run, name="llmem-store-writer", daemon=True)
        self._thread.start()

    def submit(self, key: str, value: bytes) -> bool:
        """Queue ``value`` for ``key``; False (counted in ``dropped``) when the queue is full or
        the writer is closed. Never blocks on the store."""
        check_key(key)
        with self._cond:
            self._counts["submitted"] += 1
            if self._closed or len(self._queue) >= self.max_queue or self._bytes + len(value) > self.max_queue_bytes:
                self._counts["dropped"] += 1
                return False
            self._queue.append((key, value))
            self._bytes += len(value)
            self._cond.notify()
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                key, value = self._queue.popleft()
                self._bytes -= len(value)
                self._busy += 1
            try:
                ok = self.store.put(key, value)
            except Exception as exc:  # pragma: no cover - put catches the backend's errors
                log.warning("llmem store writer: put of %r failed: %s", key, exc)
                ok = False
            with self._cond:
                self._busy -= 1
                self._counts["written" if ok else "failed"] += 1
                self._cond.notify_all()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every queued value is written (or failed); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def stats(self) -> WriterStats:
        with self._cond:
            return WriterStats(submitted=self._counts["submitted"], written=self._counts["written"],
                               failed=self._counts["failed"], dropped=self._counts["dropped"],
                               queued=len(self._queue), queued_bytes=self._bytes)
