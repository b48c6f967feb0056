"""Hybrid memories: an attention KV cache and a recurrent memory behind one interface
(llama.cpp's ``llama_memory_hybrid`` and ``llama_memory_hybrid_iswa``).

Models such as Jamba, Granite-4-H, Nemotron-H, Falcon-H1, LFM2 and Qwen3-Next interleave attention
layers (which need a KV cache) with recurrent layers (which need a per-sequence state). The hybrid
memory splits a batch once, checks that *both* parts can place every micro-batch before anything
changes, and then drives both with one context::

    mem = HybridMemory(attn=KVCache(...), recr=RecurrentMemory(...), is_recurrent_layer=pattern)
    ctx = mem.init_batch(batch, n_ubatch=512)
    for ub in ctx:                      # applies both sides
        for il in range(n_layer):
            if mem.is_recurrent_layer(il):
                s = ctx.recr.get_s(il); ...; ctx.recr.store_s(il, s_new)
            else:
                ctx.attn.cpy_k(il, k); ...; mask = ctx.attn.kq_mask()

Unlike llama.cpp, an operation that fails on either side leaves *both* sides exactly as they were
(see ``docs/deviations.md``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from . import _core, metrics
from .errors import LlmemError
from .kv_cache import IntsLike, KVCache, KVCacheContext, KVCacheISWA, KVCacheISWAContext
from .memory import (STATE_HEADER, BatchOrAllocator, Memory, MemoryContext, _wants_header, as_byte_view, locked,
                     stale_context_error)
from .recurrent import RecurrentContext, RecurrentMemory, _int
from .status import Status, status_combine, status_is_fail

__all__ = ["HybridMemory", "HybridISWAMemory", "HybridContext", "STATE_PARTIAL_ONLY"]

#: llama_state_seq_flags: with it only the recurrent part (and, for hybrid-iSWA, the SWA cache) is
#: written and read.
STATE_PARTIAL_ONLY = 1

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1

LayerPattern = Union[None, Callable[[int], bool], Sequence[bool]]




class HybridContext(MemoryContext):
    """One plan over both parts. ``attn`` and ``recr`` are the sub-contexts the model's attention
    and recurrent layers read (``ctx.attn.kq_mask()``, ``ctx.recr.get_s(il)``, ...)."""

    __slots__ = ("attn", "recr", "_status", "_i", "_n", "_no_room")

    def __init__(self, attn: MemoryContext, recr: RecurrentContext, status: Status) -> None:
        self.attn: MemoryContext = attn
        self.recr: RecurrentContext = recr
        self._status = Status(status)
        self._i = 0
        self._n = recr.n_ubatches if not status_is_fail(status) else 0

    @property
    def status(self) -> Status:
        return self._status

    def next(self) -> bool:
        """Advance both sub-contexts; False after the last micro-batch."""
        self.attn.next()
        self.recr.next()
        self._i += 1
        return self._i < self._n

    def apply(self) -> bool:
        """Apply the attention side, then the recurrent side (both always run, as llama.cpp).
        Both plans are checked first: a stale one raises StaleContextError before either changes."""
        if status_is_fail(self._status):
            raise LlmemError(f"cannot apply a context whose status is {self._status.name}")
        self.recr._memory._lock.acquire()
        try:
            # every sub-context (either may have been applied on its own through ctx.attn /
            # ctx.recr) before either part changes
            self.attn._check_apply()
            self.recr._check_apply()
            ok_attn = self.attn.apply()
            ok_recr = self.recr.apply()
            return bool(ok_attn) and bool(ok_recr)
        finally:
            self.recr._memory._lock.release()

    @property
    def ubatch(self) -> Any:
        return self.recr.ubatch

    @property
    def n_ubatches(self) -> int:
        return self._n


class HybridMemory(Memory):
    """A :class:`~llmem.KVCache` for the attention layers and a :class:`~llmem.RecurrentMemory`
    for the recurrent layers.

    ``is_recurrent_layer`` (a callable or one bool per layer) says which part holds each layer's
    state; by default a layer is recurrent when the recurrent memory has arrays for it. Both parts
    must accept the same ``n_seq_max``.
    """

    _attn_type: type = KVCache

    def __init__(self, attn: KVCache, recr: RecurrentMemory, is_recurrent_layer: LayerPattern = None) -> None:
        if not isinstance(attn, self._attn_type):
            raise TypeError(f"attn must be a {self._attn_type.__name__}, not {type(attn).__name__}")
        if not isinstance(recr, RecurrentMemory):
            raise TypeError(f"recr must be a RecurrentMemory, not {type(recr).__name__}")
        if attn.n_seq_max != recr.n_seq_max:
            raise ValueError(f"attn and recr must have the same n_seq_max, got {attn.n_seq_max} and {recr.n_seq_max}")
        n_layer = recr.n_layer
        if is_recurrent_layer is None:
            pattern = [recr.has_layer(il) for il in range(n_layer)]
        elif callable(is_recurrent_layer):
            pattern = [bool(is_recurrent_layer(il)) for il in range(n_layer)]
        else:
            pattern = [bool(x) for x in is_recurrent_layer]
            if len(pattern) != n_layer:
                raise ValueError(f"is_recurrent_layer has {len(pattern)} entries, the model has {n_layer} layers")
        self._attn = attn
        self._recr = recr
        self._pattern = pattern
        # one lock for both parts: a hybrid call is atomic, and a direct call on a part
        # (mem.mem_attn.seq_rm) cannot interleave with it
        self._lock = attn._lock
        recr._share_lock(self._lock)
        self._positions = _core.HybridPositions(attn._pos_source, recr._pos_source)

    @property
    def storage(self) -> str:
        """The parts' storage (``"numpy"``, ``"torch"``, ``"none"``), or ``"mixed"``."""
        a, r = self._attn.storage, self._recr.storage
        return a if a == r else "mixed"

    @property
    def device(self) -> Any:
        """The torch device of the attention part's tensors (torch storage), else None."""
        return self._attn.device

    def __repr__(self) -> str:
        n_rec = sum(self._pattern)
        return (f"{type(self).__name__}({len(self._pattern) - n_rec} attention + {n_rec} recurrent layers, "
                f"attn={self._attn!r}, recr={self._recr!r})")

    # -- parts -------------------------------------------------------------------------------------

    @property
    def mem_attn(self) -> KVCache:
        """The attention side."""
        return self._attn

    @property
    def mem_recr(self) -> RecurrentMemory:
        """The recurrent side."""
        return self._recr

    def is_recurrent_layer(self, il: int) -> bool:
        """Whether layer ``il`` keeps its state in the recurrent memory."""
        il = _int("il", il)
        if not 0 <= il < len(self._pattern):
            raise ValueError(f"il={il} is outside [0, {len(self._pattern)})")
        return self._pattern[il]

    @property
    def _pos_source(self) -> Any:
        return self._positions

    def _attn_caches(self, flags: int) -> List[Any]:
        return [self._attn._core] if not flags & STATE_PARTIAL_ONLY else []

    def _attn_context(self, base_ctx: Any, swa_ctx: Any) -> MemoryContext:
        return KVCacheContext(self._attn, base_ctx, self._attn._version)

    def _touch(self) -> None:
        self._attn._touch()
        self._recr._touch()

    def _attn_cores(self) -> Any:
        return self._attn._core, None

    # -- batches -----------------------------------------------------------------------------------

    def init_batch(self, balloc_or_batch: BatchOrAllocator, n_ubatch: int, embd_all: bool = False) -> HybridContext:
        """Split once as llama.cpp's hybrid does (by sequence with ``embd_all``, else equal-length
        sets, sequential when the attention cache has several streams) and check both parts can
        place every micro-batch; nothing changes. FAILED_PREPARE when either cannot."""
        n_ubatch = _int("n_ubatch", n_ubatch)
        if n_ubatch < 1:
            raise ValueError(f"n_ubatch must be >= 1, got {n_ubatch}")
        self._lock.acquire()
        try:
            balloc = self._allocator_for(balloc_or_batch)
            base, swa = self._attn_cores()
            status, cb, cs, cr = _core.hybrid_init_batch(balloc, n_ubatch, bool(embd_all), base, swa,
                                                         self._recr._mem)
            ctx = HybridContext(self._attn_context(cb, cs), RecurrentContext(self._recr, cr, self._recr._version),
                                status)
            if ctx.status == Status.FAILED_PREPARE:  # no room: ctx.no_room, stats, log
                caches = ([(self._attn, "kv")] if isinstance(self._attn, KVCache) else
                          [(self._attn.base, "kv"), (self._attn.swa, "kv_swa")])
                metrics.plan_failed(self, ctx, balloc, caches)
            return ctx
        finally:
            self._lock.release()

    def decode_step(self, seq_ids: IntsLike, tokens: Optional[IntsLike] = None) -> HybridContext:
        """One token for each of ``seq_ids`` (distinct) at its next position, every token an
        output, planned and applied in one call, as :meth:`KVCache.decode_step`: the decisions of
        ``init_batch`` with ``n_ubatch = max(len(seq_ids), n_rs_seq + 2)`` (every sequence in one
        micro-batch where the split allows, and room for the recurrent split's kept tail, as the
        C API's ``decode_step``) + ``apply`` of the first micro-batch (where the split gives
        several, the context continues with ``next()``/``apply()``), taken in one compiled call.
        Raises :class:`LlmemError` when it does not fit, changing nothing."""
        self._lock.acquire()
        try:
            base, swa = self._attn_cores()
            cb, cs, cr = _core.hybrid_decode_step(base, swa, self._recr._mem, self._positions, seq_ids, tokens)
            self._touch()  # every part applied its first micro-batch
            return HybridContext(self._attn_context(cb, cs),
                                 RecurrentContext(self._recr, cr, self._recr._version), Status.SUCCESS)
        finally:
            self._lock.release()

    @locked
    def init_full(self) -> HybridContext:
        attn, recr = self._attn.init_full(), self._recr.init_full()
        return HybridContext(attn, recr, status_combine(attn.status, recr.status))

    @locked
    def init_update(self, optimize: bool = False) -> HybridContext:
        """The attention side's pending work (K-shift, stream copies); a recurrent memory has none."""
        attn, recr = self._attn.init_update(optimize), self._recr.init_update(optimize)
        return HybridContext(attn, recr, status_combine(attn.status, Status.NO_UPDATE))

    # -- sequences ---------------------------------------------------------------------------------

    @locked
    def clear(self, data: bool = True) -> None:
        self._attn.clear(data)
        self._recr.clear(data)

    # Every operation runs both parts' checks (an iSWA attention side checks both its caches)
    # before either part changes, so a refusal leaves the whole memory as it was.
    def _check_seq_rm(self, *args: int) -> None:
        self._attn._check_seq_rm(*args)
        self._recr._check_seq_rm(*args)

    def _check_seq_cp(self, *args: int) -> None:
        self._attn._check_seq_cp(*args)
        self._recr._check_seq_cp(*args)

    def _check_seq_keep(self, *args: int) -> None:
        self._attn._check_seq_keep(*args)
        self._recr._check_seq_keep(*args)

    def _check_seq_add(self, *args: int) -> None:
        self._attn._check_seq_add(*args)
        self._recr._check_seq_add(*args)

    def _check_seq_div(self, *args: int) -> None:
        self._attn._check_seq_div(*args)
        self._recr._check_seq_div(*args)

    @locked
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """The recurrent side decides: when it refuses (a cut into the end of a sequence without a
        rollback snapshot, any negative id), nothing changes and the result is False; otherwise
        the attention side removes [p0, p1) too."""
        seq_id, p0, p1 = _int("seq_id", seq_id), _int("p0", p0), _int("p1", p1)
        if 0 <= seq_id < self.n_seq_max:
            # ids the recurrent side may accept; for any other it returns False unchanged (as
            # llama.cpp, where the attention side is never asked)
            self._check_seq_rm(seq_id, p0, p1)
        if not self._recr.seq_rm(seq_id, p0, p1):
            return False
        return bool(self._attn.seq_rm(seq_id, p0, p1))

    @locked
    def seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        """Copy [p0, p1) of the attention cells and the recurrent state. A range that leaves
        out the source's last position raises ValueError before either side changes: the
        recurrent state is that of the last position (see RecurrentMemory.seq_cp)."""
        self._check_seq_cp(seq_id_src, seq_id_dst, p0, p1)
        self._recr._check_state_range(_int("seq_id_src", seq_id_src), _int("p0", p0), _int("p1", p1))
        self._attn.seq_cp(seq_id_src, seq_id_dst, p0, p1)
        self._recr.seq_cp(seq_id_src, seq_id_dst, p0, p1)

    @locked
    def seq_keep(self, seq_id: int) -> None:
        self._check_seq_keep(seq_id)
        self._attn.seq_keep(seq_id)
        self._recr.seq_keep(seq_id)

    @locked
    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        seq_id, p0, p1, shift = _int("seq_id", seq_id), _int("p0", p0), _int("p1", p1), _int("shift", shift)
        self._check_seq_add(seq_id, p0, p1, shift)
        self._attn.seq_add(seq_id, p0, p1, shift)
        self._recr.seq_add(seq_id, p0, p1, shift)

    @locked
    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        d = _int("d", d)
        if d < 1:
            raise ValueError(f"seq_div: divisor must be >= 1, got {d}")
        self._check_seq_div(seq_id, p0, p1, d)
        self._attn.seq_div(seq_id, p0, p1, d)
        self._recr.seq_div(seq_id, p0, p1, d)

    @locked
    def seq_pos_min(self, seq_id: int) -> int:
        """max(attention min, recurrent min): the first position both parts hold."""
        return self._positions.seq_pos_min(_int("seq_id", seq_id))

    @locked
    def seq_pos_max(self, seq_id: int) -> int:
        """min(attention max, recurrent max): after decoding 0..4 a hybrid reports min = max = 4."""
        return self._positions.seq_pos_max(_int("seq_id", seq_id))

    # -- introspection -----------------------------------------------------------------------------

    def get_can_shift(self) -> bool:
        return self._attn.get_can_shift()

    @locked
    def memory_breakdown(self) -> dict[str, int]:
        """Bytes by buffer, prefixed with the part that holds it (``attn.*``, ``recr.*``)."""
        out = {f"attn.{k}": v for k, v in self._attn.memory_breakdown().items()}
        out.update({f"recr.{k}": v for k, v in self._recr.memory_breakdown().items()})
        return out

    @property
    def size(self) -> int:
        """Cells of the attention cache (the recurrent side has ``mem_recr.size``)."""
        return self._attn.size

    @property
    def used(self) -> int:
        """Cells in use in the attention cache."""
        return self._attn.used

    @property
    def head(self) -> int:
        return self._attn.head

    @property
    def n_seq_max(self) -> int:
        return self._attn.n_seq_max

    @locked
    def cells(self) -> Dict[str, Any]:
        return {"attn": self._attn.cells(), "recr": self._recr.cells()}

    # -- state -------------------------------------------------------------------------------------

    _STATE_KIND = 4

    def _state_parts(self) -> Any:
        return self._attn_caches(0), self._recr._mem

    @locked
    def state_write(self, seq_id: int = -1, flags: int = 0) -> bytes:
        """The attention section(s) then the recurrent section, in llama.cpp's layout; with
        ``STATE_PARTIAL_ONLY`` only the recurrent section; ``STATE_HEADER`` prefixes llmem's
        versioned header."""
        header_flags = flags
        flags = flags & ~STATE_HEADER if _wants_header(flags) else flags
        seq_id, flags = _int("seq_id", seq_id), _int("flags", flags)
        parts = []
        if not flags & STATE_PARTIAL_ONLY:
            parts.append(self._attn.state_write(seq_id, flags))
        parts.append(self._recr.state_write(seq_id, flags))
        return self._with_state_header(b"".join(parts), seq_id, header_flags)

    def state_read(self, data: Any, seq_id: int = -1, flags: int = 0) -> None:
        """Restore bytes of :meth:`state_write` into the whole memory (-1) or one sequence.
        All or nothing: on :class:`~llmem.StateError` neither part has changed."""
        data, flags = self._without_state_header(data, seq_id, flags)
        seq_id, flags = _int("seq_id", seq_id), _int("flags", flags)
        if flags < 0:
            raise ValueError(f"flags must be non-negative, got {flags}")
        if not (seq_id == -1 or 0 <= seq_id < self.n_seq_max):
            raise ValueError(f"seq_id must be -1 or in [0, {self.n_seq_max}), got {seq_id}")
        self._lock.acquire()
        try:
            caches = self._attn_caches(flags)
            if all(_storage_of_core(self, c) is None for c in caches) and self._recr._tstore is None:
                _core.hybrid_state_read(caches, self._recr._mem, as_byte_view(data), seq_id, flags)
                self._touch()
                return
            _read_through_storage(self, caches, as_byte_view(data), seq_id, flags)
        finally:
            self._lock.release()

    # -- checkpoints (of the recurrent side) ---------------------------------------------------
    # The attention side needs no checkpoint: its cells are shared with seq_cp. A restore hands
    # the recurrent side the state of a position the attention side must already end at.

    def set_checkpoint_limits(self, max_count: Optional[int] = None, max_bytes: Optional[int] = None) -> None:
        """See :meth:`RecurrentMemory.set_checkpoint_limits`."""
        self._recr.set_checkpoint_limits(max_count, max_bytes)

    def checkpoint_save(self, seq_id: int) -> int:
        """Checkpoint the recurrent state of ``seq_id`` (see :meth:`RecurrentMemory.checkpoint_save`)."""
        return self._recr.checkpoint_save(seq_id)

    @locked
    def checkpoint_restore(self, checkpoint_id: int, seq_id: int) -> int:
        """Restore a checkpoint into the recurrent side of ``seq_id``, whose attention side must
        end at the checkpoint's position (share the prefix's cells with ``seq_cp`` first) and
        whose recurrent side must hold no state; ValueError (nothing changed) otherwise."""
        seq_id = _int("seq_id", seq_id)
        pos = self._recr.checkpoint_pos(checkpoint_id)
        attn_last = self._attn.seq_pos_max(seq_id)
        if attn_last != pos:
            raise ValueError(f"checkpoint {checkpoint_id} holds the state after position {pos}, but the attention "
                             f"side of sequence {seq_id} ends at {attn_last}: they would not pair")
        return self._recr.checkpoint_restore(checkpoint_id, seq_id)

    def checkpoint_drop(self, checkpoint_id: int) -> bool:
        return self._recr.checkpoint_drop(checkpoint_id)

    def checkpoint_clear(self) -> None:
        self._recr.checkpoint_clear()

    def checkpoint_pos(self, checkpoint_id: int) -> int:
        return self._recr.checkpoint_pos(checkpoint_id)

    def checkpoint_has_room(self) -> bool:
        return self._recr.checkpoint_has_room()

    def checkpoint_stats(self) -> Dict[str, int]:
        return self._recr.checkpoint_stats()


class HybridISWAMemory(HybridMemory):
    """A hybrid memory whose attention side is a :class:`~llmem.KVCacheISWA` (a base cache for
    full-attention layers and a SWA cache for sliding-window layers).

    Positions of the attention side are those of the SWA cache; states are base, SWA, recurrent
    (with ``STATE_PARTIAL_ONLY``: SWA then recurrent).
    """

    _attn_type = KVCacheISWA

    def _attn_caches(self, flags: int) -> List[Any]:
        a: KVCacheISWA = self._attn  # type: ignore[assignment]  # _attn_type
        return [a.swa._core] if flags & STATE_PARTIAL_ONLY else [a.base._core, a.swa._core]

    def _attn_context(self, base_ctx: Any, swa_ctx: Any) -> MemoryContext:
        a: KVCacheISWA = self._attn  # type: ignore[assignment]  # _attn_type
        return KVCacheISWAContext(a, KVCacheContext(a.base, base_ctx, a.base._version),
                                  KVCacheContext(a.swa, swa_ctx, a.swa._version))

    def _attn_cores(self) -> Any:
        a: KVCacheISWA = self._attn  # type: ignore[assignment]  # _attn_type
        return a.base._core, a.swa._core

    _STATE_KIND = 5

    @locked
    def state_write(self, seq_id: int = -1, flags: int = 0) -> bytes:
        """Base (unless ``STATE_PARTIAL_ONLY``), SWA, then recurrent sections (after llmem's
        versioned header with ``STATE_HEADER``)."""
        header_flags = flags
        flags = flags & ~STATE_HEADER if _wants_header(flags) else flags
        seq_id, flags = _int("seq_id", seq_id), _int("flags", flags)
        payload = self._attn.state_write(seq_id, flags) + self._recr.state_write(seq_id, flags)
        return self._with_state_header(payload, seq_id, header_flags)


def _kv_parts(mem: Any) -> List[Any]:
    """The KVCache objects of a hybrid's attention side (one, or base and swa)."""
    attn = mem._attn
    return [attn.base, attn.swa] if hasattr(attn, "base") else [attn]


def _storage_of_core(mem: Any, core: Any) -> Any:
    for c in _kv_parts(mem):
        if c._core is core:
            return c._store
    return None


def _read_through_storage(mem: Any, caches: List[Any], view: Any, seq_id: int, flags: int) -> None:
    """A hybrid state read whose parts keep their tensors in a storage (torch, or none: refused):
    the core validates and places both sides all or nothing, then each storage stores its rows."""
    from .kv_cache import _no_tensors, _scatter_state
    from .storage import base as _storage
    parts = [c for c in _kv_parts(mem) if any(c._core is k for k in caches)]
    if any(p._store is not None and not p._store.has_tensors for p in parts) or (
            mem._recr._tstore is not None and not mem._recr._tstore.has_tensors):
        raise _no_tensors("state_read of a bookkeeping-only hybrid (read its parts' state_read_holes)")
    copies = [tuple(tuple(c) for c in p._core.pending_copy_list()) for p in parts]
    _, holes, cells = _core.collect_state_holes(
        lambda: _core.hybrid_state_read(caches, mem._recr._mem, view, seq_id, flags), view)
    mem._touch()
    for p, cp in zip(parts, copies):
        if p._store is None:
            continue
        ran = cp if (seq_id != -1 and cp and not p._core.pending_copies) else ()
        _scatter_state(p, _storage.StateHoles(
            view, _storage.holes_from_log(holes, cells, p._core.address, p._layers), seq_id == -1, ran))
    recr = mem._recr
    if recr._tstore is not None:
        if seq_id == -1:
            recr._tstore.zero()
        recr._tstore.scatter(view, _storage.holes_from_log(holes, cells, recr._mem.address, recr._present_layers()),
                             recr._present_index)
