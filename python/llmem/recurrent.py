"""The recurrent-state memory (llama.cpp's ``llama_memory_recurrent``).

A recurrent model (Mamba, RWKV, delta-net, the conv layers of LFM2, ...) keeps one state per
sequence instead of one K/V row per token. :class:`RecurrentMemory` holds, for every layer that has
a state, two numpy arrays: ``r(il)`` (convolution / token-shift rows) and ``s(il)`` (SSM / WKV
rows), each with ``mem_size * (1 + n_rs_seq)`` rows. The cell bookkeeping (which row holds which
sequence, which rows a computation reads) runs in the compiled core and takes llama.cpp's
decisions; the decode loop looks like this::

    ctx = mem.init_batch(batch, n_ubatch=512)
    for ub in ctx:                      # apply() places the micro-batch
        for il in layers:
            s_in = ctx.get_s(il)        # [n_seqs, n_embd_s]: the states the graph starts from
            s_out = run_layer(ub, s_in)
            ctx.store_s(il, s_out)      # written back into the ubatch's cells
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _core
from .errors import LlmemError
from .compat import Compat, resolve_compat
from .kv_cache import MAX_LAYERS
from .memory import (STATE_HEADER, BatchOrAllocator, Memory, MemoryContext, _wants_header, as_byte_view, locked,
                     new_lock, stale_context_error)
from .status import Status, status_is_fail
from .storage import base as _storage

__all__ = ["RecurrentMemory", "RecurrentContext"]

_I32_MIN = -(2**31)
_I32_MAX = 2**31 - 1

# ggml type ids written in the state bytes
_TYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}

LayerFilter = Union[None, Callable[[int], bool], Sequence[bool]]
# the P width argument: none, one width for every layer, one per layer, or il -> width
PWidths = Union[None, int, Sequence[int], Callable[[int], int]]

# state arrays per layer, in the order of the compiled core's kinds: 0 r, 1 s, 2 p
_KINDS = "rsp"
_N_KINDS = 3


def _int(name: str, value: Any, lo: int = _I32_MIN, hi: int = _I32_MAX) -> int:
    """``value`` as a Python int in [lo, hi]; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if v < lo or v > hi:
        raise ValueError(f"{name}={v} is outside [{lo}, {hi}]")
    return v


def _dtype(name: str, value: Any) -> np.dtype:
    try:
        dt = np.dtype(value)
    except TypeError:
        raise TypeError(f"{name} must be a numpy dtype, not {value!r}") from None
    if dt not in _TYPE_IDS:
        raise TypeError(f"{name} must be float32 or float16, not {dt}")
    return dt  # type: ignore[no-any-return]


def _widths(name: str, value: Any, n_layer: int) -> list[int]:
    """A row width for every layer: one int for all, or a sequence of n_layer ints."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n_layer:
            raise ValueError(f"{name} has {len(value)} entries, expected n_layer={n_layer}")
        return [_int(f"{name}[{il}]", w, 0) for il, w in enumerate(value)]
    w = _int(name, value, 0)
    return [w] * n_layer


def _p_widths(value: PWidths, n_layer: int) -> list[int]:
    """The P row width of every layer (0: no P array); see RecurrentMemory's n_embd_p."""
    if value is None:
        return [0] * n_layer
    if callable(value):
        return [_int(f"n_embd_p({il})", value(il), 0) for il in range(n_layer)]
    return _widths("n_embd_p", value, n_layer)


def _present_layers(layer_filter: LayerFilter, n_layer: int) -> list[bool]:
    if layer_filter is None:
        return [True] * n_layer
    if callable(layer_filter):
        return [bool(layer_filter(il)) for il in range(n_layer)]
    if not isinstance(layer_filter, (list, tuple, np.ndarray)):
        raise TypeError("layer_filter must be None, a callable il -> bool or a list of bools, got "
                        f"{type(layer_filter).__name__} {layer_filter!r}")
    flags = list(layer_filter)
    if len(flags) != n_layer:
        raise ValueError(f"layer_filter has {len(flags)} entries, expected n_layer={n_layer}")
    return [bool(f) for f in flags]


class RecurrentMemory(Memory):
    """llama.cpp's recurrent-state memory with numpy state arrays.

    Parameters
    ----------
    n_layer:
        The model's layer count (layers without a state included; it is written in state bytes).
    n_embd_r, n_embd_s:
        Elements per row of the r and s states: one int, or one per layer.
    mem_size:
        Number of state cells (llama.cpp uses ``max(1, n_seq_max)``). Sequence ids used in
        batches must be below it.
    n_seq_max:
        Number of sequence ids accepted.
    n_rs_seq:
        Rollback snapshots kept per sequence (0: rollback off). Each array gets ``1 + n_rs_seq``
        planes of ``mem_size`` rows; plane ``d`` holds the state ``d`` tokens before the end.
    dtype_r, dtype_s:
        ``numpy.float32`` or ``numpy.float16``.
    layer_filter:
        None (every layer has a state), a callable ``il -> bool`` or a sequence of n_layer bools.
        Layers filtered out have no arrays.
    n_embd_p:
        Elements per row of the third per-layer array, ``p(il)`` (llama.cpp's ``p_l``,
        "cache_ple_r_l": the convolution history of a per-layer-embedding module, allocated for
        the layers where ``hparams.is_ple(il)`` and ``ple_conv_state() > 0``): None (default: no
        layer has one), one int for every layer, one per layer, or a callable ``il -> int``. A
        width of 0 means no P array for that layer; layers filtered out have none either. P has
        ``dtype_r`` and as many rows as r; it is gathered and stored like r (``get_p`` /
        ``store_p``, the same copies, rollback planes and checkpoints) and travels in the state
        bytes right after each layer's r rows.
    compat:
        The llama.cpp build whose rules ``seq_rm`` follows (:mod:`llmem.compat`): ``"b11549"``
        (default) refuses to roll back a cell shared by several sequences (False, nothing
        changed) and, for a memory that keeps no layer, forces ``n_rs_seq = 0`` and rolls back by
        moving the position only; ``"b11312"`` rewinds a shared cell for all its sequences.

    Notes
    -----
    Sequence operations follow llama.cpp exactly, including its refusals: ``seq_rm`` returns
    False for ``seq_id = -1`` and for a cut into the end of a sequence that cannot be rolled back.
    A failed :meth:`state_read` raises :class:`~llmem.StateError` and changes nothing.
    Every call takes :attr:`lock` (see ``docs/threading.md``).
    """

    __slots__ = ("_mem", "_r", "_s", "_p", "_n_layer", "_dtype_r", "_dtype_s", "_own_balloc", "_present_index",
                 "_staging", "_lock", "_version", "_checkpoints", "_tstore")

    def __init__(self, n_layer: int, n_embd_r: Union[int, Sequence[int]], n_embd_s: Union[int, Sequence[int]],
                 mem_size: int, n_seq_max: int = 1, n_rs_seq: int = 0, dtype_r: Any = np.float32, dtype_s: Any = np.float32,
                 layer_filter: LayerFilter = None, compat: Any = None, n_embd_p: PWidths = None,
                 storage: Any = "numpy", device: Any = None) -> None:
        n_layer = _int("n_layer", n_layer, 1, MAX_LAYERS)
        compat = resolve_compat(compat)
        widths_r = _widths("n_embd_r", n_embd_r, n_layer)
        widths_s = _widths("n_embd_s", n_embd_s, n_layer)
        widths_p = _p_widths(n_embd_p, n_layer)
        mem_size = _int("mem_size", mem_size, 1)
        n_seq_max = _int("n_seq_max", n_seq_max, 1)
        n_rs_seq = _int("n_rs_seq", n_rs_seq, 0)
        spec = _storage.resolve_storage(storage, device)
        if spec.name == "torch":  # torch dtypes as the numpy dtypes the core knows
            from .storage.torch_storage import numpy_float_dtype
            dtype_r, dtype_s = numpy_float_dtype(dtype_r, "dtype_r"), numpy_float_dtype(dtype_s, "dtype_s")
        self._dtype_r = _dtype("dtype_r", dtype_r)
        self._dtype_s = _dtype("dtype_s", dtype_s)
        present = _present_layers(layer_filter, n_layer)
        no_layers = not any(present)
        if compat is Compat.B11549 and no_layers:
            n_rs_seq = 0  # b11549: no rollback snapshots for a memory that keeps no layer

        self._mem = _core.rs_memory(mem_size, n_seq_max, n_rs_seq)  # checks the sizes
        self._mem.set_b11549_rules(compat is Compat.B11549, no_layers)
        rows = mem_size * (1 + n_rs_seq)
        self._n_layer = n_layer
        self._tstore: Any = None  # numpy storage: the core holds the arrays and moves their rows
        self._own_balloc = None
        self._lock = new_lock()  # an RLock that C callers can take too (docs/capi.md)
        # bumped by every change of the cells: a context planned at another value is stale
        self._version = 0
        self._staging: dict[int, np.ndarray] = {}
        self._checkpoints: Optional[_core.rs_checkpoints] = None  # the checkpoint pool, made at first use
        self._present_index = []
        for il in range(n_layer):
            self._present_index.append(sum(present[:il]) if present[il] else -1)
        # numpy arrays, or torch tensors with torch storage (None: a layer without state)
        self._r: list[Any] = []
        self._s: list[Any] = []
        self._p: list[Optional[np.ndarray]] = [None] * n_layer
        if spec.name != "numpy":
            if any(widths_p[il] > 0 and present[il] for il in range(n_layer)):
                raise ValueError(f"n_embd_p={n_embd_p!r}: the P array (llama.cpp's PLE conv history) is held "
                                 f"by numpy storage only, not by storage={spec.name!r}")
            self._attach_storage(spec, rows, widths_r, widths_s, present)
            return
        self._r = [np.zeros((rows, widths_r[il]), self._dtype_r) if present[il] else None for il in range(n_layer)]
        self._s = [np.zeros((rows, widths_s[il]), self._dtype_s) if present[il] else None for il in range(n_layer)]
        self._p = [np.zeros((rows, widths_p[il]), self._dtype_r) if present[il] and widths_p[il] > 0 else None
                   for il in range(n_layer)]
        self._mem.attach_buffers(
            n_layer,
            [a for a in self._r if a is not None],
            [a for a in self._s if a is not None],
            _TYPE_IDS[self._dtype_r],
            _TYPE_IDS[self._dtype_s],
            # P arrays (type r), one entry per present layer, only when some layer has one
            [self._p[il] for il in range(n_layer) if present[il]] if any(a is not None for a in self._p) else [],
        )

    def _attach_storage(self, spec: Any, rows: int, widths_r: List[int], widths_s: List[int],
                        present: List[bool]) -> None:
        """No host arrays: the core gets the row sizes only; torch storage allocates the tensors."""
        n_layer = self._n_layer
        kept = [il for il in range(n_layer) if present[il]]
        isz_r, isz_s = self._dtype_r.itemsize, self._dtype_s.itemsize
        self._mem.attach_geometry(n_layer, [widths_r[il] * isz_r for il in kept], [widths_s[il] * isz_s for il in kept],
                                  _TYPE_IDS[self._dtype_r], _TYPE_IDS[self._dtype_s])
        if spec.name == "torch":
            from .storage.torch_storage import TorchRS
            self._tstore = TorchRS(spec, rows, [widths_r[il] if present[il] else None for il in range(n_layer)],
                                   [widths_s[il] if present[il] else None for il in range(n_layer)],
                                   self._dtype_r, self._dtype_s)
            self._r, self._s = self._tstore.r, self._tstore.s
        else:
            from .kv_cache import _NoTensors
            self._tstore = _NoTensors()
            self._r = [None] * n_layer
            self._s = [None] * n_layer

    def __repr__(self) -> str:
        return (f"RecurrentMemory(n_layer={self._n_layer}, mem_size={self.size}, n_seq_max={self.n_seq_max}, "
                f"n_rs_seq={self.n_rs_seq}, used={self.used})")

    # -- state arrays -----------------------------------------------------------------------------

    def r(self, il: int) -> np.ndarray:
        """The r state array of layer ``il``: ``[mem_size * (1 + n_rs_seq), n_embd_r]``."""
        return self._layer_array(self._r, "r", il)

    def s(self, il: int) -> np.ndarray:
        """The s state array of layer ``il``: ``[mem_size * (1 + n_rs_seq), n_embd_s]``."""
        return self._layer_array(self._s, "s", il)

    def p(self, il: int) -> np.ndarray:
        """The p array of layer ``il`` (see ``n_embd_p``): ``[mem_size * (1 + n_rs_seq), n_embd_p]``.
        ValueError for a layer without one."""
        return self._layer_array(self._p, "p", il)

    def has_p(self, il: int) -> bool:
        """Whether layer ``il`` has a p array."""
        il = _int("il", il, 0, self._n_layer - 1)
        return self._p[il] is not None

    def has_layer(self, il: int) -> bool:
        """Whether layer ``il`` has state arrays (it passed ``layer_filter``)."""
        il = _int("il", il, 0, self._n_layer - 1)
        return self._r[il] is not None

    def _arrays(self, kind: int) -> List[Optional[np.ndarray]]:
        return self._r if kind == 0 else self._s if kind == 1 else self._p

    def _array_slot(self, kind: int, il: int) -> tuple[int, np.dtype]:
        """(index among the present layers, dtype) of array ``kind`` (0: r, 1: s, 2: p) of layer il."""
        dtype = self._dtype_s if kind == 1 else self._dtype_r
        if type(il) is int and 0 <= il < self._n_layer and self._present_index[il] >= 0 and \
                (kind != 2 or self._p[il] is not None):
            return self._present_index[il], dtype
        self._layer_array(self._arrays(kind), _KINDS[kind], il)  # raises for a bad il
        return self._present_index[operator.index(il)], dtype

    def _staging_for(self, kind: int, layer: int, il: int) -> np.ndarray:
        """The reused array get_r/get_s/get_p gather into: as many rows as cells, allocated once."""
        key = _N_KINDS * layer + kind
        staging = self._staging.get(key)
        if staging is None:
            src = self._arrays(kind)[il]
            assert src is not None  # staging is asked only for layers with a state
            staging = np.empty((self.size, src.shape[1]), src.dtype)
            self._staging[key] = staging
        return staging

    @property
    def storage(self) -> str:
        """``"numpy"``, ``"torch"`` or ``"none"`` (bookkeeping-only)."""
        return "numpy" if self._tstore is None else self._tstore.name

    @property
    def device(self) -> Any:
        """The torch device of the states (torch storage), else None."""
        return getattr(self._tstore, "device", None)

    def _layer_array(self, arrays: List[Optional[np.ndarray]], kind: str, il: int) -> np.ndarray:
        il = _int("il", il, 0, self._n_layer - 1)
        if self._tstore is not None and not self._tstore.has_tensors and self._present_index[il] >= 0:
            from .kv_cache import _no_tensors
            raise _no_tensors(f"{kind}({il})")
        a = arrays[il]
        if a is None:
            left_out = self._r[il] is None
            why = "it was left out by layer_filter" if left_out else "its n_embd_p is 0"
            raise ValueError(f"layer il={il} has no {kind} state ({why})")
        return a

    # -- batches ----------------------------------------------------------------------------------

    def init_batch(self, balloc_or_batch: BatchOrAllocator, n_ubatch: int,
                   embd_all: bool = False) -> RecurrentContext:
        """Split a batch as llama.cpp's recurrent memory does (sequential equal split, or by
        sequence when ``embd_all``) and check every micro-batch fits; changes nothing.

        The context's status is FAILED_PREPARE when the batch cannot be split entirely (a token
        shared by several sequences without ``embd_all``) or a sequence id is >= ``mem_size``.
        """
        if type(n_ubatch) is not int or not 1 <= n_ubatch <= _I32_MAX:
            n_ubatch = _int("n_ubatch", n_ubatch, 1)
        self._lock.acquire()
        try:
            balloc = self._allocator_for(balloc_or_batch)
            return RecurrentContext(self, self._mem.init_batch(balloc, n_ubatch, bool(embd_all)), self._version)
        finally:
            self._lock.release()

    @locked
    def init_full(self) -> RecurrentContext:
        """A SUCCESS context over every cell (for sizing a compute graph)."""
        return RecurrentContext(self, self._mem.init_full())

    @locked
    def init_update(self, optimize: bool = False) -> RecurrentContext:
        """Always NO_UPDATE: a recurrent memory has no pending work."""
        return RecurrentContext(self, self._mem.init_update())

    def _touch(self) -> None:
        """Record a change of the cells (contexts planned before it become stale)."""
        self._version += 1

    @property
    def _pos_source(self) -> Any:
        """The compiled memory, read by the batch allocator without Python calls."""
        return self._mem

    # -- sequences --------------------------------------------------------------------------------

    @locked
    def clear(self, data: bool = True) -> None:
        """Forget every sequence and pending rollback; with ``data`` zero every state array."""
        self._mem.clear(bool(data))
        if data and self._tstore is not None and self._tstore.has_tensors:
            self._tstore.zero()
        self._version += 1

    @locked
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of a sequence, as llama.cpp's recurrent memory.

        True when the range holds the whole sequence (it is erased), does not reach its last
        position (nothing changes), or cuts at most ``n_rs_seq`` tokens off its end with no
        rollback pending (the rollback is recorded). False otherwise, and for ``seq_id`` outside
        ``[0, n_seq_max)`` (also -1) or ``>= mem_size``.
        """
        removed = self._mem.seq_rm(_int("seq_id", seq_id), _int("p0", p0), _int("p1", p1))
        self._version += 1
        return removed

    @locked
    def seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make ``seq_id_dst`` share the state of ``seq_id_src``; ids outside ``[0, mem_size)``
        do nothing. An empty source erases dst. The state is the one after the source's last
        position, so a range that does not reach that position (``0 <= p1 <= last``, or
        ``p0 > last``) raises ValueError and changes nothing (llama.cpp ignores the range and
        pairs the copy with the wrong state; docs/deviations.md)."""
        seq_id_src, p0, p1 = _int("seq_id_src", seq_id_src), _int("p0", p0), _int("p1", p1)
        self._check_state_range(seq_id_src, p0, p1)
        self._mem.seq_cp(seq_id_src, _int("seq_id_dst", seq_id_dst), p0, p1)
        self._version += 1

    def _check_state_range(self, seq_id_src: int, p0: int, p1: int) -> None:
        """ValueError when a seq_cp of [p0, p1) from ``seq_id_src`` would hand the destination
        a state of a position outside the range (the source's state is that of its last one)."""
        last = self._mem.seq_pos_max(seq_id_src)
        if last < 0 or (p0 < 0 and p1 < 0):
            return
        lo, hi = max(p0, 0), (p1 if p1 >= 0 else _I32_MAX)
        if not lo <= last < hi:
            raise ValueError(
                f"seq_cp({seq_id_src}, ..., p0={p0}, p1={p1}): the recurrent state of sequence {seq_id_src} is "
                f"that after its last position {last}, which the range leaves out; copying it would pair "
                f"positions [{p0}, {p1}) with the wrong state. Copy a range that ends at the last position "
                f"(p1=-1), or restore a checkpoint taken at the position wanted")

    @locked
    def seq_keep(self, seq_id: int) -> None:
        """Remove every sequence except ``seq_id`` (any id: -1 removes all)."""
        self._mem.seq_keep(_int("seq_id", seq_id))
        self._version += 1

    @locked
    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        """Add ``shift`` to the sequence's position if it lies in [p0, p1). Every sequence
        sharing the state moves with it. ValueError (nothing changed) if it would leave int32."""
        self._mem.seq_add(_int("seq_id", seq_id), _int("p0", p0), _int("p1", p1), _int("shift", shift))
        self._version += 1

    @locked
    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Divide the sequence's position by ``d`` (toward zero) if it lies in [p0, p1).
        ValueError for ``d == 0``."""
        self._mem.seq_div(_int("seq_id", seq_id), _int("p0", p0), _int("p1", p1), _int("d", d))
        self._version += 1

    # What each sequence operation would raise, without the change (the hybrids check both parts
    # before changing either); seq_rm, seq_cp and seq_keep refuse only bad argument types.
    def _check_seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> None:
        _int("seq_id", seq_id), _int("p0", p0), _int("p1", p1)

    def _check_seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        _int("seq_id_src", seq_id_src), _int("seq_id_dst", seq_id_dst), _int("p0", p0), _int("p1", p1)

    def _check_seq_keep(self, seq_id: int) -> None:
        _int("seq_id", seq_id)

    def _check_seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self._mem.check_seq_add(_int("seq_id", seq_id), _int("p0", p0), _int("p1", p1), _int("shift", shift))

    def _check_seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        self._mem.check_seq_div(_int("seq_id", seq_id), _int("p0", p0), _int("p1", p1), _int("d", d))

    @locked
    def seq_pos_min(self, seq_id: int) -> int:
        """Position of the sequence's state (a recurrent memory keeps only the last); -1 if none."""
        return self._mem.seq_pos_min(_int("seq_id", seq_id))

    @locked
    def seq_pos_max(self, seq_id: int) -> int:
        """The last position the state has seen, as :meth:`seq_pos_min`, but never below -1
        (llama.cpp's maximum starts at -1: a position moved below 0 by ``seq_add`` reads -1)."""
        return self._mem.seq_pos_max(_int("seq_id", seq_id))

    @locked
    def rs_idx(self) -> np.ndarray:
        """Pending rollback depth of every sequence id (0: none), a copy."""
        return self._mem.rs_idx()

    # -- introspection ----------------------------------------------------------------------------

    def get_can_shift(self) -> bool:
        """True: positions can be shifted (only the recorded position changes)."""
        return True

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes of the r and s arrays (all planes, all present layers), and of the p arrays
        (key ``"p"``) when some layer has one."""
        out = {
            "r": sum(a.nbytes for a in self._r if a is not None),
            "s": sum(a.nbytes for a in self._s if a is not None),
        }
        if any(a is not None for a in self._p):
            out["p"] = sum(a.nbytes for a in self._p if a is not None)
        return out

    @property
    def size(self) -> int:
        """Number of state cells (``mem_size``)."""
        return self._mem.size

    @property
    @locked
    def used(self) -> int:
        """llama.cpp's count of used cells (it can drift after a negative ``seq_add``)."""
        return self._mem.used

    @property
    @locked
    def head(self) -> int:
        """First cell of the last placed slot; where the free-cell search starts."""
        return self._mem.head

    @property
    def n_seq_max(self) -> int:
        return self._mem.n_seq_max

    @property
    def n_rs_seq(self) -> int:
        """Rollback snapshots per sequence."""
        return self._mem.n_rs_seq

    @property
    def n_layer(self) -> int:
        return self._n_layer

    @property
    @locked
    def n(self) -> int:
        """Cells spanned by the last placed slot (llama.cpp's ``n``)."""
        return self._mem.n

    @property
    @locked
    def rs_z(self) -> int:
        """Row zeroed for new sequences by the last placed slot, -1 if none."""
        return self._mem.rs_z

    @property
    def dtype_r(self) -> np.dtype:
        return self._dtype_r

    @property
    def dtype_s(self) -> np.dtype:
        return self._dtype_s

    @locked
    def cells(self) -> Dict[str, Any]:
        """Snapshot of the cell metadata: int32 arrays ``pos``, ``src``, ``src0`` and ``tail``
        (``tail[s]`` is the cell of sequence ``s``, -1 if none) and ``seq_ids``, a list with the
        ascending tuple of sequence ids of each cell."""
        return self._mem.cells()

    # -- state bytes ------------------------------------------------------------------------------

    _STATE_KIND = 3

    def _state_parts(self) -> Any:
        return [], self._mem

    @locked
    def state_write(self, seq_id: int = -1, flags: int = 0) -> bytes:
        """llama.cpp's recurrent state block for the whole memory (-1) or one sequence.

        A pending rollback is written as the snapshot it selects. Raises :class:`LlmemError`
        where llama.cpp aborts: a whole write while sequences sharing a cell have different
        pending rollbacks, or ``ON_DEVICE`` (flag 2) over non-contiguous cells.
        """
        payload_flags = flags & ~STATE_HEADER if _wants_header(flags) else flags
        seq_id = _int("seq_id", seq_id)
        if self._tstore is not None:
            if not self._tstore.has_tensors:
                from .kv_cache import _no_tensors
                raise _no_tensors("state_write (use state_write_holes)")
            w = self.state_write_holes(seq_id, payload_flags)
            self._tstore.fill(w.data, w.holes, self._present_index)
            return self._with_state_header(bytes(w.data), seq_id, flags)
        return self._with_state_header(self._mem.state_write(seq_id, _int("flags", payload_flags, 0)), seq_id, flags)

    @locked
    def state_write_holes(self, seq_id: int = -1, flags: int = 0) -> _storage.StateHoles:
        """The state block (a ``bytearray``) with the r/s rows left zero and described by
        :class:`~llmem.storage.StateHole` s (``kind`` ``"r"`` or ``"s"``, ``layer``, ``cells``:
        the absolute rows of the layer's ``[mem_size * (1 + n_rs_seq), width]`` array, in order):
        filled from the caller's arrays the bytes are ``state_write``'s (docs/storage.md)."""
        seq_id = _int("seq_id", seq_id)
        data, holes, cells = _core.collect_state_holes(
            lambda: self._mem.state_write(seq_id, _int("flags", flags, 0)), None)
        buf = bytearray(data)
        return _storage.StateHoles(buf, _storage.holes_from_log(holes, cells, self._mem.address,
                                                                self._present_layers()))

    @locked
    def state_read_holes(self, data: Any, seq_id: int = -1, flags: int = 0) -> _storage.StateHoles:
        """Restore a block's cells (all or nothing, as :meth:`state_read`) and return the r/s row
        sections the caller's arrays take: ``data[offset:offset+nbytes]`` are the rows ``cells``."""
        view = as_byte_view(data)
        _, holes, cells = _core.collect_state_holes(
            lambda: self._mem.state_read(view, _int("seq_id", seq_id), _int("flags", flags, 0)), view)
        self._version += 1
        return _storage.StateHoles(view, _storage.holes_from_log(holes, cells, self._mem.address,
                                                                 self._present_layers()), seq_id == -1)

    def _present_layers(self) -> List[int]:
        return [il for il in range(self._n_layer) if self._present_index[il] >= 0]

    @locked
    def state_read(self, data: Any, seq_id: int = -1, flags: int = 0) -> None:
        """Restore a block written by :meth:`state_write` (or llama.cpp) into the whole memory
        (-1) or into sequence ``seq_id`` (which may differ from the one written).

        Raises :class:`~llmem.StateError` (truncated or trailing bytes, a layer count, dtype or
        row size that differs, too many cells, sequence ids out of range or repeated, more than
        one cell for one sequence) and then leaves the memory, metadata and arrays, unchanged.
        """
        data, flags = self._without_state_header(data, seq_id, flags)
        if self._tstore is not None:
            if not self._tstore.has_tensors:
                from .kv_cache import _no_tensors
                raise _no_tensors("state_read (use state_read_holes)")
            read = self.state_read_holes(data, seq_id, flags)
            if read.clear_first:
                self._tstore.zero()
            self._tstore.scatter(read.data, read.holes, self._present_index)
            return
        self._mem.state_read(as_byte_view(data), _int("seq_id", seq_id), _int("flags", flags, 0))
        self._version += 1

    # -- checkpoints ------------------------------------------------------------------------------
    # A checkpoint is a copy of one sequence's state (its r, s and p rows of every present layer) at
    # its current position, kept by a bounded pool: it outlives the sequence and restores into any
    # sequence that holds no state. numpy storage: the rows are copied in the compiled core without
    # the GIL, into host memory. torch storage: the core's pool keeps the bookkeeping only (ids,
    # positions, limits, bytes) and the rows are copied by torch on the device. Bookkeeping-only
    # (storage=None): the same pool, and the engine copies the rows of state_row(seq_id). The
    # prefix cache (llmem.PrefixCache) takes one after every decode.

    #: limits of a pool nobody configured: checkpoints, and bytes in all
    DEFAULT_CHECKPOINT_COUNT = 256
    DEFAULT_CHECKPOINT_BYTES = 1 << 30

    def _pool(self) -> _core.rs_checkpoints:
        pool = self._checkpoints
        if pool is None:
            pool = self._checkpoints = _core.rs_checkpoints(self._mem, self.DEFAULT_CHECKPOINT_COUNT,
                                                            self.DEFAULT_CHECKPOINT_BYTES, self._tstore is None)
        return pool

    @locked
    def state_row(self, seq_id: int) -> int:
        """Row of the current state of ``seq_id`` in every present layer's r and s arrays
        (``plane * size + cell``; a pending rollback: the snapshot it selects), -1 when it holds
        none. A bookkeeping-only memory's engine copies this row out after ``checkpoint_save``
        and into it after ``checkpoint_restore``."""
        return int(self._mem.seq_state_row(_int("seq_id", seq_id)))

    @locked
    def set_checkpoint_limits(self, max_count: Optional[int] = None, max_bytes: Optional[int] = None) -> None:
        """Bound the checkpoint pool by a count and by bytes (None keeps a limit). Checkpoints
        above lowered limits stay until dropped; saves fail until the pool is under them."""
        pool = self._pool()
        count = pool.max_count if max_count is None else _int("max_count", max_count, 0, 2**62)
        nbytes = pool.max_bytes if max_bytes is None else _int("max_bytes", max_bytes, 0, 2**62)
        pool.set_limits(count, nbytes)

    @locked
    def checkpoint_save(self, seq_id: int) -> int:
        """Copy the state of ``seq_id`` at its current position (a pending rollback: the state it
        selects) into a new checkpoint; returns the checkpoint's id. Take it after a decode has
        stored its states. ValueError when the sequence holds no state, :class:`LlmemError` when
        the pool is full (nothing changes either way). Bookkeeping-only memories: the engine then
        copies row ``state_row(seq_id)`` of its arrays (see docs/storage.md)."""
        seq_id = _int("seq_id", seq_id)
        pool = self._pool()
        cid: int = pool.save(self._mem, seq_id)
        store = self._tstore
        if store is not None and store.has_tensors:
            try:
                store.checkpoint_save(cid, int(self._mem.seq_state_row(seq_id)))
            except BaseException:
                pool.drop(cid)
                raise
        return cid

    @locked
    def checkpoint_restore(self, checkpoint_id: int, seq_id: int) -> int:
        """Give ``seq_id``, which must hold no state, the checkpoint's state: it then stands at
        the checkpoint's position, which is returned (the next token goes at that + 1). The
        checkpoint stays in the pool. ValueError (nothing changed) for an unknown id or a
        sequence holding a state or outside ``[0, min(mem_size, n_seq_max))``. Bookkeeping-only
        memories: the engine then copies the checkpoint's rows into row ``state_row(seq_id)``."""
        pool = self._pool()
        checkpoint_id = _int("checkpoint_id", checkpoint_id, 0, 2**63 - 1)
        seq_id = _int("seq_id", seq_id)
        pool.restore(self._mem, checkpoint_id, seq_id)
        self._version += 1
        store = self._tstore
        if store is not None and store.has_tensors:
            store.checkpoint_restore(checkpoint_id, int(self._mem.seq_state_row(seq_id)))
        return pool.pos(checkpoint_id)

    @locked
    def checkpoint_drop(self, checkpoint_id: int) -> bool:
        """Forget a checkpoint (its slot is reused); False when there is none with that id."""
        checkpoint_id = _int("checkpoint_id", checkpoint_id, -(2**63), 2**63 - 1)
        dropped: bool = self._pool().drop(checkpoint_id)
        if dropped and self._tstore is not None and self._tstore.has_tensors:
            self._tstore.checkpoint_drop(checkpoint_id)
        return dropped

    @locked
    def checkpoint_clear(self) -> None:
        """Forget every checkpoint."""
        self._pool().clear()
        if self._tstore is not None and self._tstore.has_tensors:
            self._tstore.checkpoint_clear()

    @locked
    def checkpoint_pos(self, checkpoint_id: int) -> int:
        """Position of the checkpointed state; ValueError for an unknown id."""
        return self._pool().pos(_int("checkpoint_id", checkpoint_id, -(2**63), 2**63 - 1))

    @locked
    def checkpoint_has_room(self) -> bool:
        """Whether one more checkpoint fits the pool's limits."""
        return self._pool().has_room()

    @locked
    def checkpoint_stats(self) -> Dict[str, int]:
        """``count``, ``bytes`` (held), ``max_count``, ``max_bytes`` and ``checkpoint_bytes``
        (one checkpoint) of the pool."""
        pool = self._pool()
        return {"count": pool.count, "bytes": pool.bytes_used, "max_count": pool.max_count,
                "max_bytes": pool.max_bytes, "checkpoint_bytes": pool.checkpoint_bytes}


class RecurrentContext(MemoryContext):
    """The plan returned by :meth:`RecurrentMemory.init_batch` (or ``init_full``/``init_update``).

    After ``apply()``, ``get_r(il)``/``get_s(il)`` return the states the model graph starts the
    micro-batch from, ``[n_seqs, n_embd]``, and ``store_r``/``store_s`` write the new states back.
    Call ``get_*`` or ``store_*`` for every present layer once per micro-batch (``get_p``/``store_p``
    too for the layers with a p array), as the graph does:
    the first call for an array also zeroes row ``rs_z`` and moves the states of the slot's other
    cells (llama.cpp's ``s_copy_extra``).
    """

    __slots__ = ("_ctx", "_memory", "_gathered", "_version")

    def __init__(self, memory: RecurrentMemory, ctx: _core.rs_context, version: Optional[int] = None) -> None:
        self._memory = memory
        self._ctx = ctx
        self._gathered: dict[int, np.ndarray] = {}
        # the memory's version the plan is valid for (None: full/update contexts, always valid)
        self._version = version

    def _is_fresh(self) -> bool:
        return self._version is None or self._version == self._memory._version

    def _check_fresh(self, what: str) -> None:
        if self._version is not None and self._version != self._memory._version:
            raise stale_context_error(what)

    def _check_apply(self) -> None:
        self._check_fresh("apply")
        ctx = self._ctx
        if status_is_fail(ctx.status):
            raise LlmemError(f"cannot apply a memory context whose status is {Status(ctx.status).name}")
        if not ctx.is_full and ctx.n_ubatches and ctx.applied:
            raise LlmemError("this micro-batch was already applied: call next() first")

    @property
    def status(self) -> Status:
        return self._ctx.status

    def next(self) -> bool:
        """Move to the next micro-batch; False when there is none."""
        self._gathered.clear()
        return self._ctx.next()

    def apply(self) -> bool:
        """Place the current micro-batch in the memory (True, as llama.cpp); StaleContextError
        (nothing changed) when the memory changed since the plan was made."""
        memory = self._memory
        memory._lock.acquire()
        try:
            self._check_fresh("apply")
            applied = self._ctx.apply()
            self._gathered.clear()
            if self._version is not None:
                memory._version += 1
                self._version = memory._version
            return applied
        finally:
            memory._lock.release()

    @property
    def ubatch(self) -> Any:
        """The current micro-batch (None for full and update contexts)."""
        return self._ctx.ubatch

    @property
    def n_ubatches(self) -> int:
        return self._ctx.n_ubatches

    # head, n_rs and rs_z are read from the memory's last placed slot: under its lock, as another
    # thread's call (a state read, with the GIL released) may be changing them
    @property
    def head(self) -> int:
        """First cell of the slot (0 for a full context)."""
        with self._memory._lock:
            return self._ctx.head

    @property
    def n_rs(self) -> int:
        """Cells in the slot (``mem_size`` for a full context)."""
        with self._memory._lock:
            return self._ctx.n_rs

    @property
    def rs_z(self) -> int:
        """Row holding the zero state new sequences start from, -1 if none (0 when full)."""
        with self._memory._lock:
            return self._ctx.rs_z

    def s_copy_all(self) -> np.ndarray:
        """For each slot cell ``k``, the row its input state is read from (int32[n_rs]).

        Evaluated once per applied micro-batch: reading it consumes pending rollbacks (the row
        then addresses a snapshot plane), so later calls return the same values.
        """
        self._memory._lock.acquire()
        try:
            self._check_fresh("s_copy_all")
            return self._ctx.s_copy_all()  # a new array; the values are cached in the context
        finally:
            self._memory._lock.release()

    def s_copy(self, i: int) -> int:
        """Row the input state of slot cell ``i`` is read from (see :meth:`s_copy_all`)."""
        copies = self.s_copy_all()
        return int(copies[_int("i", i, 0, len(copies) - 1)])

    def get_r(self, il: int) -> np.ndarray:
        """Input r states of the micro-batch's sequence sets, ``[n_seqs, n_embd_r]``.

        The first call for a layer in a micro-batch zeroes row ``rs_z``, gathers the rows of
        ``s_copy`` and moves the slot's other cells (as the graph does); later calls return the
        same array. It is a view of a staging array the memory reuses for every micro-batch
        (no allocation per step): copy it to keep it past the next micro-batch's ``get_r(il)``.
        """
        return self._gather(0, il)

    def get_s(self, il: int) -> np.ndarray:
        """Input s states of the micro-batch's sequence sets, ``[n_seqs, n_embd_s]`` (see
        :meth:`get_r`)."""
        return self._gather(1, il)

    def store_r(self, il: int, new: np.ndarray) -> None:
        """Write the new r states: C-contiguous ``[n_seqs, n_embd_r]`` (plane 0), or
        ``[k, n_seqs, n_embd_r]`` with ``k <= 1 + n_rs_seq`` where ``new[d]`` is the state ``d``
        tokens before the end (the rollback snapshots)."""
        self._store(0, il, new)

    def store_s(self, il: int, new: np.ndarray) -> None:
        """Write the new s states; shapes as :meth:`store_r`."""
        self._store(1, il, new)

    def get_p(self, il: int) -> np.ndarray:
        """Input p states (the layer's third array, see ``RecurrentMemory(n_embd_p=...)``),
        ``[n_seqs, n_embd_p]``: read through ``s_copy`` like :meth:`get_r`. ValueError for a
        layer without a p array."""
        return self._gather(2, il)

    def store_p(self, il: int, new: np.ndarray) -> None:
        """Write the new p states; shapes as :meth:`store_r` (``k`` planes for the rollback
        snapshots, as llama.cpp keeps one per rollback slot)."""
        self._store(2, il, new)

    def _gather(self, kind: int, il: int) -> np.ndarray:
        memory = self._memory
        layer, _ = memory._array_slot(kind, il)
        key = _N_KINDS * layer + kind
        memory._lock.acquire()
        try:
            self._check_fresh("get_" + _KINDS[kind])
            out = self._gathered.get(key)
            if out is None and memory._tstore is not None:
                ctx = self._ctx
                ctx.mark_gathered(kind, layer)  # checks (applied, once per micro-batch) and marks
                out = memory._tstore.gather(memory._tstore.array(kind, il), ctx.s_copy_all(), ctx.n_seqs,
                                            memory._mem.head, memory._mem.rs_z, memory.size, memory.n_rs_seq)
                self._gathered[key] = out
            if out is None:
                staging = memory._staging_for(kind, layer, il)
                n_seqs = self._ctx.n_seqs
                self._ctx.gather(kind, layer, staging)
                out = staging[:n_seqs]
                self._gathered[key] = out
            return out
        finally:
            memory._lock.release()

    def _store(self, kind: int, il: int, new: Any) -> None:
        memory = self._memory
        layer, dtype = memory._array_slot(kind, il)
        name = "new " + _KINDS[kind]
        if memory._tstore is not None:
            with memory._lock:
                self._check_fresh("store_" + _KINDS[kind])
                if _N_KINDS * layer + kind not in self._gathered:
                    self._gather(kind, il)  # the slot's other cells move before their rows are overwritten
                store = memory._tstore
                rows = store.rows(new, self._ctx.n_seqs, store.array(kind, il), memory.n_rs_seq + 1, name)
                self._ctx.mark_stored(kind, layer, rows.shape[0])
                store.store(store.array(kind, il), rows, memory._mem.head, memory.size)
            return
        if not isinstance(new, np.ndarray):
            raise TypeError(f"{name} states must be a numpy array, not {type(new).__name__}")
        if new.dtype != dtype:
            raise TypeError(f"{name} states of layer {il} must be {dtype}, not {new.dtype}")
        memory._lock.acquire()
        try:
            self._check_fresh("store_" + _KINDS[kind])
            self._ctx.store(kind, layer, new, memory._mem.n_rs_seq + 1)
        finally:
            memory._lock.release()
