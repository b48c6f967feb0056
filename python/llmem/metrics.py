"""Logging and metrics: the ``"llmem"`` logger, :meth:`Memory.stats` and the no-room report.

The logger is silent by default (a :class:`logging.NullHandler`); a server turns it on with the
usual ``logging`` configuration. It reports, at these levels:

- WARNING ``llmem``: a plan that failed for lack of cells (with the :class:`~llmem.NoRoom`
  report) and a state restore that was refused (with :attr:`StateError.reason`);
- INFO: K-shifts applied (``init_update().apply()`` after ``seq_add``/``seq_div``).

``Memory.stats()`` returns a :class:`MemoryStats` snapshot. The counts of cells and sequences are
read from the compiled core in one call; the running totals are plain integers bumped where the
work happens (tokens placed and K-shifts in the core, failed plans and state bytes here), so a
snapshot costs a few microseconds and can be taken every step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Type, TypedDict


from .errors import NoRoom

if TYPE_CHECKING:  # pragma: no cover
    from .hybrid import HybridMemory as _HybridMemory
    from .kv_cache import KVCache as _KVCache, KVCacheISWA as _KVCacheISWA
    from .memory import Memory, MemoryContext
    from .recurrent import RecurrentMemory as _RecurrentMemory

__all__ = ["MemoryStats", "logger"]

#: llmem's logger. Silent unless the application configures logging.
logger: logging.Logger = logging.getLogger("llmem")
logger.addHandler(logging.NullHandler())


class MemoryStats(TypedDict):
    """One memory's :meth:`~llmem.Memory.stats` snapshot (a plain dict, ready for JSON).

    For a composite memory (iSWA, hybrid) the cell and token counts are the sums over its parts,
    ``cells_used_per_stream`` adds up the parts' streams (the KV caches of one memory have the
    same streams; a recurrent memory has one), and ``parts`` holds each part's own snapshot.
    The state counters of a composite count the calls made on it; its parts count the sections
    they wrote or read for it as well.
    """

    kind: str                          #: the class name
    cells: int                         #: cells in all streams
    cells_used: int                    #: cells holding at least one sequence
    cells_used_per_stream: List[int]   #: the same per stream
    sequences: int                     #: sequence ids holding at least one cell
    tokens_placed: int                 #: tokens of the micro-batches applied
    plans_failed_no_room: int          #: ``init_batch`` calls that found no room (FAILED_PREPARE)
    state_bytes_written: int           #: bytes returned or written by the state_write calls
    state_bytes_read: int              #: bytes given to state_read calls that succeeded
    state_reads_refused: int           #: state_read calls that raised StateError
    k_shifts: int                      #: K-shifts applied (``update`` with shifted positions)
    parts: Dict[str, "MemoryStats"]    #: the parts of a composite memory (empty otherwise)


class _Counters:
    """The totals counted in Python for one memory (kept in its ``__dict__``)."""

    __slots__ = ("plans_failed_no_room", "state_bytes_written", "state_bytes_read",
                 "state_reads_refused", "depth")

    def __init__(self) -> None:
        self.plans_failed_no_room: int = 0
        self.state_bytes_written: int = 0
        self.state_bytes_read: int = 0
        self.state_reads_refused: int = 0
        self.depth: int = 0  # state calls in progress on this memory (only the outermost counts)


def counters(memory: Any) -> _Counters:
    """The Python-side counters of ``memory``, created on first use."""
    c = memory.__dict__.get("_llmem_counters")
    if c is None:
        c = memory.__dict__.setdefault("_llmem_counters", _Counters())
    return c  # type: ignore[no-any-return]


# -- no room ------------------------------------------------------------------------------------

def _all_tokens(balloc: Any) -> Optional[Tuple[List[int], List[List[int]]]]:
    """(first sequence id of each token, every id of each token) of the allocator's batch, in
    batch order; None when the batch cannot be taken in one piece."""
    n = int(balloc.n_tokens)
    balloc.split_reset()
    ub = balloc.split_simple(n)
    if len(ub) != n:
        balloc.split_reset()
        return None
    ids = ub.seq_id.tolist()
    balloc.split_reset()
    return [row[0] for row in ids], [[x for x in row if x >= 0] for row in ids]


def kv_no_room(cache: Any, balloc: Any, label: str) -> Optional[NoRoom]:
    """The no-room report of a failed plan on a KV cache, or None when the cache has room for
    every token (the plan failed for another reason, or in another part).

    The free cells are those a slot search may take now (empty, or in a sliding-window cache out
    of every window). Tokens are taken in batch order, each stream filling up in turn; for a
    sliding-window cache, whose later micro-batches may free more cells, the count is an upper
    bound."""
    tokens = _all_tokens(balloc)
    if tokens is None:
        return None
    first_ids, all_ids = tokens
    core = cache._core
    n_stream = int(core.n_stream)
    free = [int(core.usable_in_stream(s)) for s in range(n_stream)]
    need = [0] * n_stream
    unplaced: set[int] = set()
    for seq, ids in zip(first_ids, all_ids):
        s = 0 if n_stream == 1 else seq
        if not 0 <= s < n_stream:
            return None
        need[s] += 1
        if need[s] > free[s]:
            unplaced.update(ids)
    missing = sum(max(0, need[s] - free[s]) for s in range(n_stream))
    if missing == 0:
        return None
    return NoRoom(tuple(sorted(unplaced)), missing, label)


def plan_failed(memory: Any, ctx: Any, balloc: Any, caches: List[Tuple[Any, str]]) -> None:
    """Record a failed ``init_batch``: the first KV cache out of room gives ``ctx.no_room``,
    the failure is counted and logged."""
    report = None
    for cache, label in caches:
        report = kv_no_room(cache, balloc, label)
        if report is not None:
            break
    if report is None:
        return
    label = report.memory
    ctx._no_room = report
    counters(memory).plans_failed_no_room += 1
    if logger.isEnabledFor(logging.WARNING):
        logger.warning("no room: %s needs %d more free cells; sequences not placed: %s",
                       type(memory).__name__ + (f" ({label})" if label != "kv" else ""),
                       report.cells_missing, list(report.seq_ids))


# -- stats --------------------------------------------------------------------------------------

def _stats(kind: str, cells: int, per_stream: List[int], sequences: int, tokens: int,
           k_shifts: int, memory: Any, parts: Dict[str, MemoryStats]) -> MemoryStats:
    c = counters(memory)
    return MemoryStats(kind=kind, cells=cells, cells_used=sum(per_stream),
                       cells_used_per_stream=per_stream, sequences=sequences,
                       tokens_placed=tokens, plans_failed_no_room=c.plans_failed_no_room,
                       state_bytes_written=c.state_bytes_written,
                       state_bytes_read=c.state_bytes_read,
                       state_reads_refused=c.state_reads_refused, k_shifts=k_shifts, parts=parts)


def _combine(kind: str, memory: Any, parts: Dict[str, MemoryStats], sequences: int) -> MemoryStats:
    per_stream: List[int] = []
    for p in parts.values():
        for s, u in enumerate(p["cells_used_per_stream"]):
            if s < len(per_stream):
                per_stream[s] += u
            else:
                per_stream.append(u)
    return _stats(kind, sum(p["cells"] for p in parts.values()), per_stream, sequences,
                  sum(p["tokens_placed"] for p in parts.values()),
                  sum(p["k_shifts"] for p in parts.values()), memory, parts)


_Classes = Tuple["Type[_KVCache]", "Type[_RecurrentMemory]", "Type[_KVCacheISWA]", "Type[_HybridMemory]"]
_CLASSES: Optional[_Classes] = None


def _classes() -> _Classes:
    """The memory classes (imported once: this module is below them)."""
    global _CLASSES
    if _CLASSES is None:
        from .hybrid import HybridMemory
        from .kv_cache import KVCache, KVCacheISWA
        from .recurrent import RecurrentMemory

        _CLASSES = (KVCache, RecurrentMemory, KVCacheISWA, HybridMemory)
    return _CLASSES


def memory_stats(memory: "Memory") -> MemoryStats:
    """The snapshot behind :meth:`Memory.stats`."""
    KVCache, RecurrentMemory, KVCacheISWA, HybridMemory = _CLASSES or _classes()
    kind = type(memory).__name__
    if isinstance(memory, KVCache):
        core = memory._core
        used, n_seqs, tokens, k_shifts = core.stats_counts()
        return _stats(kind, int(core.size) * int(core.n_stream), used, n_seqs, tokens, k_shifts,
                      memory, {})
    if isinstance(memory, RecurrentMemory):
        mem = memory._mem
        return _stats(kind, int(mem.size), [int(mem.used)], int(mem.n_seqs_present),
                      int(mem.tokens_placed), 0, memory, {})
    if isinstance(memory, KVCacheISWA):
        parts = {"base": memory.base.stats(), "swa": memory.swa.stats()}
        return _combine(kind, memory, parts, max(p["sequences"] for p in parts.values()))
    if isinstance(memory, HybridMemory):
        parts = {"attn": memory.mem_attn.stats(), "recr": memory.mem_recr.stats()}
        return _combine(kind, memory, parts, max(p["sequences"] for p in parts.values()))
    raise TypeError(f"no stats for {kind}")  # pragma: no cover - every memory is one of the above
