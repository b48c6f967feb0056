"""A state store in a local directory: one file per value, published atomically, bounded by bytes.

A value is written to a temporary file in the same directory (``.tmp-*``), flushed and fsync'ed,
then renamed over its final name (``os.replace``, atomic on POSIX) and the directory fsync'ed: a
writer killed at any point leaves either no file under the key's name or a whole one; its
temporary file is never read and is removed by the next store opened on the directory (when
older than ``stale_seconds``). Several processes may share the directory.

The bound: a put that takes the directory's values over ``max_bytes`` removes the least recently
used files (by modification time; a get touches its file) until the values fit in 90% of it.
The count of held bytes is this process's view, refreshed by a scan of the directory whenever
the bound is reached, so other processes' writes are accounted at the next eviction.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from typing import List, Optional, Sequence, Tuple, Union

from .base import StateStore

__all__ = ["DiskStore"]

_SUFFIX = ".llmem"


class DiskStore(StateStore):
    """Values as files under ``path`` (created if missing), at most ``max_bytes`` in all."""

    def __init__(self, path: Union[str, "os.PathLike[str]"], max_bytes: int = 16 << 30, *,
                 fsync: bool = True, stale_seconds: float = 600.0) -> None:
        super().__init__()
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        self.path: str = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        self.max_bytes: int = max_bytes
        self.fsync: bool = bool(fsync)
        self._lock = threading.Lock()
        now = time.time()
        for entry in os.scandir(self.path):
            if entry.name.startswith(".tmp-"):
                try:
                    if now - entry.stat().st_mtime > stale_seconds:
                        os.unlink(entry.path)  # a killed writer's leftover
                except OSError:
                    pass
        self._bytes, self._n = self._scan()

    def __repr__(self) -> str:
        return f"DiskStore({self.path!r}, max_bytes={self.max_bytes})"

    def _file(self, key: str) -> str:
        return os.path.join(self.path, hashlib.blake2b(key.encode("utf-8"), digest_size=20).hexdigest() + _SUFFIX)

    def _scan(self) -> Tuple[int, int]:
        total = n = 0
        for entry in os.scandir(self.path):
            if entry.name.endswith(_SUFFIX):
                try:
                    total += entry.stat().st_size
                    n += 1
                except OSError:
                    pass
        return total, n

    def _put(self, key: str, value: memoryview) -> bool:
        if len(value) > self.max_bytes:
            return False
        final = self._file(key)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(value)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            try:
                old = os.stat(final).st_size
            except FileNotFoundError:
                old = -1
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if self.fsync:
            dfd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        with self._lock:
            self._bytes += len(value) - max(old, 0)
            self._n += old < 0
            over = self._bytes > self.max_bytes
        if over:
            self._evict(keep=final)
        return True

    def _evict(self, keep: str) -> None:
        files = []
        for entry in os.scandir(self.path):
            if entry.name.endswith(_SUFFIX):
                try:
                    st = entry.stat()
                except OSError:
                    continue
                files.append((st.st_mtime, st.st_size, entry.path))
        total = sum(f[1] for f in files)
        files.sort()
        target = self.max_bytes * 9 // 10
        removed = 0
        for _, size, path in files:
            if total <= target:
                break
            if path == keep:
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # another process evicted it
            total -= size
            removed += 1
        with self._lock:
            self._bytes = total
            self._n = len(files) - removed
        if removed:
            self._count("evictions", removed)

    def _get(self, key: str) -> Optional[bytes]:
        path = self._file(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return data

    def _delete(self, key: str) -> None:
        path = self._file(key)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return
        with self._lock:
            self._bytes -= size
            self._n -= 1

    def _exists(self, keys: Sequence[str]) -> List[bool]:
        return [os.path.exists(self._file(k)) for k in keys]

    def _held(self) -> Tuple[int, int]:
        with self._lock:
            return self._bytes, self._n
