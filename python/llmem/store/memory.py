"""A state store in this process's memory, bounded by bytes, least recently used out first."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

from .base import StateStore

__all__ = ["MemoryStore"]


class MemoryStore(StateStore):
    """Values in host memory (a host-memory tier, or a test double of a shared store).

    ``max_bytes`` bounds the bytes of the values held: a put that would exceed it evicts the
    least recently used values (a get counts as a use) first; a value larger than the bound is
    not stored (``put`` answers False).
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        super().__init__()
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        self.max_bytes: int = max_bytes
        self._values: "OrderedDict[str, bytes]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStore(max_bytes={self.max_bytes}, held={self._bytes})"

    def _put(self, key: str, value: memoryview) -> bool:
        if len(value) > self.max_bytes:
            return False
        data = bytes(value)  # a copy of our own: the caller's buffer may change
        with self._lock:
            old = self._values.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            evicted = 0
            while self._values and self._bytes + len(data) > self.max_bytes:
                _, dropped = self._values.popitem(last=False)
                self._bytes -= len(dropped)
                evicted += 1
            self._values[key] = data
            self._bytes += len(data)
        if evicted:
            self._count("evictions", evicted)
        return True

    def _get(self, key: str) -> Optional[bytes]:
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
            return value

    def _delete(self, key: str) -> None:
        with self._lock:
            old = self._values.pop(key, None)
            if old is not None:
                self._bytes -= len(old)

    def _exists(self, keys: Sequence[str]) -> List[bool]:
        with self._lock:
            return [k in self._values for k in keys]

    def _held(self) -> Tuple[int, int]:
        with self._lock:
            return self._bytes, len(self._values)

    def clear(self) -> None:
        """Drop every value."""
        with self._lock:
            self._values.clear()
            self._bytes = 0
