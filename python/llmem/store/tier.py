"""The store tier of a prefix cache: what :class:`llmem.PrefixCache` takes as ``store=``.

A prefix is stored as the state of a sequence holding exactly its first ``k * block_size``
tokens, under the key of block ``k`` (:class:`PrefixKeys`). The prefix cache spills a prefix when
it evicts the cached content ending there (K/V cells cut at the last block boundary of the
evicted node; a recurrent state only where a checkpoint lies on a block boundary: use a
``checkpoint_interval`` that is a multiple of ``block_size``), through an :class:`AsyncWriter`;
on a request whose longest prefix held in memory is shorter than one in the store, it restores
the stored state into the request's sequence.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Optional, Tuple, TypedDict, cast

from ..memory import STATE_HEADER, Memory
from .base import StateStore, pack_value, unpack_value
from ..errors import StateError
from .keys import ExtraKey, PrefixKeys
from .writer import AsyncWriter

__all__ = ["PrefixStore", "TierStats"]

log: logging.Logger = logging.getLogger("llmem")


class TierStats(TypedDict):
    """What :meth:`PrefixStore.stats` returns: the tier's own counters (the store's are in
    :meth:`StateStore.stats`, the writer's in :meth:`AsyncWriter.stats`)."""

    lookups: int
    hits: int
    hit_tokens: int
    misses: int
    refused: int
    spills: int
    spilled_tokens: int
    spill_dropped: int
    spill_failed: int


class PrefixStore:
    """A store, the content keys of one model and memory, and the write-back thread.

    ``asynchronous=False`` writes in the caller's thread (tests, a local directory).
    """

    def __init__(self, store: StateStore, model_id: str, memory: Memory, *, block_size: int = 16,
                 asynchronous: bool = True, max_queue: int = 64, max_queue_bytes: int = 256 << 20) -> None:
        if not isinstance(store, StateStore):
            raise TypeError(f"store must be a StateStore, not {type(store).__name__}")
        self.store: StateStore = store
        self.keys: PrefixKeys = PrefixKeys(model_id, memory, block_size)
        self.block_size: int = self.keys.block_size
        self.writer: Optional[AsyncWriter] = (AsyncWriter(store, max_queue, max_queue_bytes)
                                              if asynchronous else None)
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = {k: 0 for k in TierStats.__annotations__}

    def __repr__(self) -> str:
        return f"PrefixStore({self.store!r}, {self.keys!r})"

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def stats(self) -> TierStats:
        with self._lock:
            return cast(TierStats, dict(self._counts))

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait for the queued writes (True at once without a writer)."""
        return True if self.writer is None else self.writer.flush(timeout)

    def close(self) -> None:
        """Write what is queued and stop the writer (the store itself stays open)."""
        if self.writer is not None:
            self.writer.close()

    # -- used by PrefixCache -------------------------------------------------------------------------

    def spill(self, tokens: Any, extra: ExtraKey, n_tokens: int, state: bytes) -> bool:
        """Store ``state`` (headered bytes of a sequence holding exactly ``tokens[:n_tokens]``,
        ``n_tokens`` a multiple of the block size) under its key."""
        keys = self.keys.block_keys(tokens, extra, n_tokens // self.block_size)
        if not keys or len(keys) * self.block_size != n_tokens:
            return False
        key = keys[-1]
        value = pack_value(key, state, n_tokens)
        ok = self.writer.submit(key, value) if self.writer is not None else self.store.put(key, value)
        self._count("spills" if ok else "spill_dropped")
        if ok:
            self._count("spilled_tokens", n_tokens)
        return ok

    def lookup(self, tokens: Any, extra: ExtraKey, n_max: int, n_have: int) -> List[Tuple[str, int]]:
        """(key, length) of the stored prefixes of ``tokens[:n_max]`` longer than ``n_have``,
        longest first (one round trip to the store)."""
        self._count("lookups")
        keys = self.keys.block_keys(tokens, extra, n_max // self.block_size)
        first = n_have // self.block_size  # keys[i] names (i + 1) * block_size tokens
        wanted = keys[first:]
        if not wanted:
            return []
        found = self.store.contains(wanted)
        return [(k, (first + i + 1) * self.block_size) for i, k in reversed(list(enumerate(wanted))) if found[i]]

    def note_spill_failed(self, exc: BaseException) -> None:
        """A prefix could not be assembled for a spill (counted, logged at debug level)."""
        self._count("spill_failed")
        log.debug("llmem store: a prefix was not spilled: %s", exc)

    def fetch(self, tokens: Any, extra: ExtraKey, n_max: int, n_have: int) -> List[Tuple[str, int, bytes]]:
        """The longest stored prefix of ``tokens[:n_max]`` longer than ``n_have``, fetched:
        ``[(key, length, value)]``, or ``[]`` (counted as a miss)."""
        for key, length in self.lookup(tokens, extra, n_max, n_have)[:2]:
            value = self.store.get(key)
            if value is not None:
                return [(key, length, value)]
        self._count("misses")
        return []

    def restore_value(self, memory: Memory, seq_id: int, key: str, length: int, value: bytes, exact: bool) -> bool:
        """Read a fetched prefix (``length`` tokens) into ``seq_id`` (empty). ``exact``: the
        memory has a recurrent part, whose state must be at ``length``; a K/V state holding
        more is cut back. False (the sequence left empty, the refused value deleted) when it
        cannot be used."""
        try:
            n_tokens, state = unpack_value(key, value)
            if n_tokens < length or (exact and n_tokens != length):
                raise StateError(f"stored prefix holds {n_tokens} tokens, its key names {length}", "CORRUPT")
            memory.state_read(state, seq_id, STATE_HEADER)  # type: ignore[arg-type]  # any bytes-like object
        except StateError as exc:
            self._count("refused")
            self.store.refuse(key, exc)
            return False
        end = memory.seq_pos_max(seq_id)
        if end != n_tokens - 1:
            # a state that does not hold the positions its envelope promises
            memory.seq_rm(seq_id, -1, -1)
            self._count("refused")
            self.store.refuse(key, StateError(f"stored state ends at position {end}, its envelope says "
                                              f"{n_tokens - 1}", "CORRUPT"))
            return False
        if n_tokens > length:
            memory.seq_rm(seq_id, length, -1)
        self._count("hits")
        self._count("hit_tokens", length)
        return True
