"""Shared state stores: prefixes and sequences that outlive a process and move between processes.

* :class:`StateStore` — the interface: bytes under string keys, plus :meth:`~StateStore.put_sequence`
  / :meth:`~StateStore.get_sequence`, which store a sequence's headered state bytes (checked on
  read: a state never lands in a memory it does not fit) in an envelope tied to its key.
* Backends: :class:`MemoryStore` (host memory, LRU by bytes), :class:`DiskStore` (a directory,
  atomic files, bounded by bytes), :class:`RedisStore` (a Redis server; ``llmem[redis]``).
* :class:`PrefixKeys` — content keys (model identity, memory configuration and chained hashes of
  token blocks), the same in every process.
* :class:`AsyncWriter` — write-back from a background thread with a bounded queue.
* :class:`PrefixStore` — what :class:`llmem.PrefixCache` takes as ``store=``: a store, the keys
  and the writer together (the tiered prefix cache; see docs/store.md).
"""

from __future__ import annotations

from .base import StateStore, StoreStats
from .disk import DiskStore
from .keys import ExtraKey, PrefixKeys
from .memory import MemoryStore
from .redis import RedisStore
from .tier import PrefixStore
from .writer import AsyncWriter, WriterStats

__all__ = ["AsyncWriter", "DiskStore", "ExtraKey", "MemoryStore", "PrefixKeys", "PrefixStore", "RedisStore",
           "StateStore", "StoreStats", "WriterStats"]
