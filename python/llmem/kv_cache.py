"""The attention KV cache (``KVCache``) and its interleaved sliding-window pairing (``KVCacheISWA``).

The cell bookkeeping (which cell holds which position of which sequence, the slot search, the
sequence operations, masks and the state bytes) runs in the compiled core with llama.cpp's
decisions. The K and V tensors are numpy arrays owned by the Python objects:

* ``k(il)``: ``[n_stream, kv_size, n_embd_k]``, row ``c`` of stream ``s`` is the K vector of cell ``c``;
* ``v(il)``: ``[n_stream, kv_size, n_embd_v]``, or with ``v_trans`` (the default, as llama.cpp without
  flash attention) ``[n_stream, n_embd_v_max, kv_size]``.

Element types are float16, float32 or bfloat16 (stored as uint16 bit patterns), or one of the
block types llama.cpp offers for its cache (``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``,
``iq4_nl``), stored as ggml's blocks in ``uint8`` rows: ``k(il)`` is then
``[n_stream, kv_size, row_bytes]``. A quantized V needs ``v_trans=False`` (llama.cpp: flash attention).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Union, cast

import numpy as np
import numpy.typing as npt

from . import _core
from .batch import Batch, UBatch
from . import metrics
from .compat import resolve_compat, resolve_state_format
from .errors import LlmemError
from .ggml_types import GGMLType, dequantize, ggml_type
from .memory import BatchOrAllocator, Memory, MemoryContext, as_byte_view, locked, new_lock, stale_context_error
from .status import Status, SWAType, status_combine
from .storage import base as _storage

#: Sequence ids or token ids of a decode step: a list of ints or a 1-D integer array.
IntsLike = Union[Sequence[int], "npt.NDArray[np.integer[Any]]"]
#: A writable C-contiguous buffer passed as ``out=``: an array, or raw bytes of its size.
WritableBuffer = Union["npt.NDArray[Any]", bytearray, memoryview]

__all__ = ["Rope", "KVCache", "KVCacheISWA", "KVCacheContext", "KVCacheISWAContext",
           "STATE_PARTIAL_ONLY", "PagedKV"]

#: ``state_write``/``state_read`` flag: for an iSWA cache, only the sliding-window part.
STATE_PARTIAL_ONLY = 1

_TYPE_F32, _TYPE_F16, _TYPE_BF16 = 0, 1, 30


@dataclasses.dataclass(frozen=True)
class Rope:
    """The RoPE the model applies to K, so that a position shift can re-rotate stored K rows.

    ``n_rot`` elements of each head (``head_dim`` elements, default ``n_rot``) are rotated, in
    ``mode`` ``"normal"`` (pairs ``2k, 2k+1``) or ``"neox"`` (pairs ``k, k + n_rot/2``), with ggml's
    formulas (YaRN when ``ext_factor != 0``).
    """

    n_rot: int
    freq_base: float = 10000.0
    freq_scale: float = 1.0
    mode: str = "normal"
    head_dim: Optional[int] = None
    ext_factor: float = 0.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("normal", "neox"):
            raise ValueError(f"rope mode must be 'normal' or 'neox', got {self.mode!r}")
        if (isinstance(self.n_rot, bool) or not isinstance(self.n_rot, (int, np.integer)) or self.n_rot <= 0
                or self.n_rot % 2):
            raise ValueError(f"rope n_rot must be a positive even int, got {self.n_rot!r}")
        if self.head_dim is not None:
            _check_int(self.head_dim, "rope head_dim", int(self.n_rot))
        _check_int(self.n_ctx_orig, "rope n_ctx_orig")
        # a NaN or infinite parameter would silently write NaN into every shifted K row
        for name in ("freq_base", "freq_scale", "ext_factor", "attn_factor", "beta_fast", "beta_slow"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"rope {name} must be a float, got {type(value).__name__} {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"rope {name} must be finite, got {value!r}")
        for name in ("freq_base", "freq_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"rope {name} must be positive, got {getattr(self, name)!r}")

    @property
    def neox(self) -> bool:
        return self.mode == "neox"


def _as_rope(rope: Any) -> Optional[Rope]:
    if rope is None or isinstance(rope, Rope):
        return rope
    if isinstance(rope, dict):
        return Rope(**rope)
    raise TypeError(f"rope must be a llmem.Rope, a dict or None, not {type(rope).__name__}")


def _kv_type(dtype: Any, name: str) -> tuple[int, np.dtype]:
    """(ggml type id, numpy storage dtype) of a dtype argument: a numpy float dtype, or a ggml type
    name of the one table in :mod:`llmem.ggml_types` (``"bf16"``, ``"q8_0"``, ``"q4_0"``...)."""
    t = ggml_type(dtype, name)
    return t.id, t.storage


def _float_rows(values: np.ndarray, name: str) -> np.ndarray:
    """Model rows as C-contiguous float32, the input of the quantizers."""
    if values.dtype.kind != "f":
        raise TypeError(f"{name} must hold floats, got {values.dtype}")
    return np.ascontiguousarray(values, dtype=np.float32)


def _to_storage(values: np.ndarray, type_id: int, name: str) -> np.ndarray:
    """Convert model values to the cache's element type (bf16: round to nearest even)."""
    if type_id == _TYPE_BF16:
        if values.dtype == np.uint16:
            return values
        if values.dtype.kind != "f":
            raise TypeError(f"{name} must hold floats (or uint16 bf16 bits), got {values.dtype}")
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)
    if values.dtype.kind != "f":
        raise TypeError(f"{name} must hold floats, got {values.dtype}")
    return values


def _per_layer(value: Any, n_layer: int, name: str) -> list[int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        vals = [int(value)] * n_layer
    else:
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise TypeError(f"{name} must be an int or one int per layer, got {type(value).__name__} {value!r}")
        vals = [_check_int(v, f"{name}[{il}]", -(2**63)) for il, v in enumerate(value)]
        if len(vals) != n_layer:
            raise ValueError(f"{name} has {len(vals)} entries, expected n_layer = {n_layer}")
    for il, v in enumerate(vals):
        if v < 0:
            raise ValueError(f"{name}[{il}] must not be negative, got {v}")
    return vals


#: More layers than any model has; a bound that keeps a typo (n_layer=10**12) a clear error
#: instead of a MemoryError while building per-layer lists.
MAX_LAYERS = 1 << 16

#: Largest n_seq_max (llmem's limit, also the batch allocator's).
_SEQ_MAX_LIMIT = 1 << 16

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


def _check_int(value: Any, name: str, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def _i32(value: Any, name: str) -> int:
    """An int32 argument (positions, shifts); TypeError/ValueError naming it otherwise."""
    if type(value) is int and _I32_MIN <= value <= _I32_MAX:
        return value
    return _check_int(value, name, _I32_MIN, _I32_MAX)


def _layer_reuse_map(reuse: Union[Callable[[int], int], Sequence[int], None], n_layer: int,
                     kept: list[int]) -> dict[int, int]:
    """{layer: the layer whose K/V it reads} for the kept layers that reuse another (llama.cpp's
    layer_reuse_cb: il -> il_src, or a negative value for a layer with its own K/V)."""
    if reuse is None:
        return {}
    if callable(reuse):
        srcs = [reuse(il) for il in range(n_layer)]
    elif isinstance(reuse, (list, tuple, np.ndarray)):
        srcs = list(reuse)
        if len(srcs) != n_layer:
            raise ValueError(f"layer_reuse has {len(srcs)} entries, expected n_layer = {n_layer}")
    else:
        raise TypeError(f"layer_reuse must be a callable il -> il_src, a list of ints or None, got "
                        f"{type(reuse).__name__}")
    kept_set = set(kept)
    out: dict[int, int] = {}
    for il, src in enumerate(srcs):
        src = _check_int(src, f"layer_reuse({il})", -(2**31), n_layer - 1)
        if src < 0 or il not in kept_set:
            continue
        if src == il:
            raise ValueError(f"layer_reuse: layer {il} cannot reuse itself")
        out[il] = src
    for il, src in out.items():
        if src in out:
            raise ValueError(f"layer_reuse: layer {il} reuses layer {src}, which reuses layer {out[src]}: "
                             "a reused layer must have its own K/V")
    return out


class KVCache(Memory):
    """llama.cpp's attention KV cache with numpy K/V buffers.

    Parameters follow llama.cpp: ``kv_size`` cells per stream; ``unified=False`` gives one stream
    per sequence; ``n_swa``/``swa_type`` make a sliding-window cache; ``layer_filter(il)`` selects
    the model layers this cache stores; ``rope`` (a :class:`Rope`) enables the K-shift applied by
    ``init_update().apply()`` after ``seq_add``/``seq_div``. ``n_pos_per_embd > 1`` marks an
    M-RoPE model (cells keep 2-D coordinates; positions cannot be shifted).

    ``dtype_k``/``dtype_v`` take numpy float dtypes or ggml type names (``"q8_0"``, ``"q4_0"``,
    ``"q4_1"``, ``"q5_0"``, ``"q5_1"``, ``"iq4_nl"``, ``"f16"``, ``"bf16"``, ``"f32"``); a quantized V
    needs ``v_trans=False``. ``compat`` (``"b11549"``, the default, or ``"b11312"``) picks the
    llama.cpp build whose state bytes ``state_write`` produces (``state_format`` 4 or 3 overrides
    it); ``n_rot_k``/``n_rot_v`` are b11549's attention rotation sizes recorded in format 4.
    ``layer_reuse`` (llama.cpp's ``layer_reuse_cb``, Gemma3n/Gemma4: ``il -> source layer``, or a
    negative value) lets a layer read another layer's K/V: it gets no buffers, ``k(il)``/``v(il)``
    and the context reads return the source's, and it writes nothing. ``cell_tokens`` keeps each
    cell's token (in the state bytes too, as llama.cpp's cell ext of n-gram embedding models) for
    :meth:`seq_pos_tok_le`.

    ``storage`` says where K and V live (``docs/storage.md``): ``"numpy"`` (the default, host
    arrays), ``"torch"`` with ``device=`` (torch tensors on that device, ``dtype_k``/``dtype_v``
    f32/f16/bf16 as torch or numpy dtypes or names; or a :class:`llmem.storage.TorchStorage` with
    tensors of the caller's), or ``None``/``"none"``: no tensors, the caller keeps them and
    performs what :meth:`pending_update`, :meth:`state_write_holes` and :meth:`state_read_holes`
    describe.
    """

    __slots__ = ("_core", "_k", "_v", "_layers", "_layer_index", "_type_k", "_type_v", "_rope",
                 "_vt", "_ev", "_own_balloc", "_lock", "_version", "_ek", "_reuse", "_store", "_step")

    def __init__(self, n_layer: int, n_embd_k_gqa: Union[int, Sequence[int]],
                 n_embd_v_gqa: Union[int, Sequence[int]], kv_size: int, n_seq_max: int = 1,
                 dtype_k: "npt.DTypeLike" = np.float16, dtype_v: "npt.DTypeLike" = np.float16,
                 v_trans: bool = True, unified: bool = True,
                 n_pad: int = 1, n_swa: int = 0, swa_type: Union[SWAType, int] = SWAType.NONE,
                 layer_filter: Optional[Callable[[int], bool]] = None, rope: Optional[Rope] = None,
                 n_pos_per_embd: int = 1, compat: Any = None, state_format: Optional[int] = None,
                 n_rot_k: int = 0, n_rot_v: int = 0,
                 layer_reuse: Union[Callable[[int], int], Sequence[int], None] = None,
                 cell_tokens: bool = False, storage: Any = "numpy", device: Any = None) -> None:
        n_layer = _check_int(n_layer, "n_layer", 0, MAX_LAYERS)
        spec = _storage.resolve_storage(storage, device)
        if spec.name == "torch":  # torch dtypes named as ggml types for the core
            from .storage.torch_storage import torch_dtype
            t_k, t_v = torch_dtype(dtype_k, "dtype_k"), torch_dtype(dtype_v, "dtype_v")
            dtype_k, dtype_v = (_TORCH_NAMES[str(t_k)], _TORCH_NAMES[str(t_v)])
        compat = resolve_compat(compat)
        state_format = resolve_state_format(state_format, compat)
        n_rot_k = _check_int(n_rot_k, "n_rot_k", 0, 1 << 16)
        n_rot_v = _check_int(n_rot_v, "n_rot_v", 0, 1 << 16)
        kv_size = _check_int(kv_size, "kv_size", 1)
        n_seq_max = _check_int(n_seq_max, "n_seq_max", 1, _SEQ_MAX_LIMIT)
        n_pad = _check_int(n_pad, "n_pad", 1)
        n_swa = _check_int(n_swa, "n_swa")
        n_pos_per_embd = _check_int(n_pos_per_embd, "n_pos_per_embd", 1, 4)
        swa_type = SWAType(swa_type)
        ek = _per_layer(n_embd_k_gqa, n_layer, "n_embd_k_gqa")
        ev = _per_layer(n_embd_v_gqa, n_layer, "n_embd_v_gqa")
        if layer_filter is not None and not callable(layer_filter):
            raise TypeError("layer_filter must be callable (il -> bool) or None")
        self._type_k, dt_k = _kv_type(dtype_k, "dtype_k")
        self._type_v, dt_v = _kv_type(dtype_v, "dtype_v")
        self._rope = _as_rope(rope)
        kept = [il for il in range(n_layer) if layer_filter is None or layer_filter(il)]
        self._reuse = _layer_reuse_map(layer_reuse, n_layer, kept)
        self._layers = [il for il in kept if il not in self._reuse]
        self._layer_index = {il: l for l, il in enumerate(self._layers)}
        for il, src in self._reuse.items():
            if src not in self._layer_index:
                raise ValueError(f"layer_reuse: layer {il} reuses layer {src}, which this cache does not "
                                 f"store (stored: {self._layers})")
            self._layer_index[il] = self._layer_index[src]
        # layers the cache does not hold may have no K/V (recurrent or MLP-only layers of a hybrid
        # model); they still count for the transposed V width
        for il in self._layers:
            if ek[il] <= 0 or ev[il] <= 0:
                raise ValueError(f"layer {il} is stored in this cache but n_embd_k_gqa[{il}] = {ek[il]}, "
                                 f"n_embd_v_gqa[{il}] = {ev[il]}: both must be positive")
        e_vmax = max(ev) if ev else 0
        self._vt = bool(v_trans)
        self._ev = [ev[il] for il in self._layers]
        self._ek = [ek[il] for il in self._layers]
        self._own_balloc = None
        self._lock = new_lock()  # an RLock that C callers can take too (docs/capi.md)
        # bumped by every change of the cells: a context planned at another value is stale
        self._version = 0
        # decode_step's reusable compiled contexts and k-row arrays (made by its first call)
        self._step: Any = None
        self._core = _core.KVCache(
            kv_size, n_seq_max, bool(unified), n_pad, n_swa, int(swa_type), n_pos_per_embd,
            self._type_k, self._type_v, bool(v_trans), self._layers,
            [ek[il] for il in self._layers], [ev[il] for il in self._layers], e_vmax, self._rope,
            n_rot_k, n_rot_v, state_format, bool(cell_tokens))
        n_stream = self._core.n_stream
        self._k, self._v = [], []
        self._store: Any = None  # numpy: the core holds the buffers and does their tensor work
        if spec.name != "numpy":
            self._attach_storage(spec, n_stream, kv_size, e_vmax)
            return
        tk, tv = self.ggml_type_k, self.ggml_type_v
        for l, il in enumerate(self._layers):
            # a block type: one uint8 row of ggml blocks per cell
            k = np.zeros((n_stream, kv_size, tk.row_size(ek[il]) if tk.quantized else ek[il]), dtype=dt_k)
            if v_trans:
                v = np.zeros((n_stream, e_vmax, kv_size), dtype=dt_v)
            else:
                v = np.zeros((n_stream, kv_size, tv.row_size(ev[il]) if tv.quantized else ev[il]), dtype=dt_v)
            self._core.set_layer_buffers(l, k, v)
            self._k.append(k)
            self._v.append(v)

    def _attach_storage(self, spec: Any, n_stream: int, kv_size: int, e_vmax: int) -> None:
        if spec.name == "torch":
            from .storage.torch_storage import TorchKV, torch_dtype
            self._store = TorchKV(spec, self._layers, n_stream, kv_size, self._ek, self._ev, e_vmax, self._vt,
                                  torch_dtype(self.type_k, "dtype_k"), torch_dtype(self.type_v, "dtype_v"))
            self._k, self._v = self._store.k, self._store.v
        else:
            self._store = _NoTensors()

    @property
    def storage(self) -> str:
        """``"numpy"``, ``"torch"`` or ``"none"`` (bookkeeping-only)."""
        return "numpy" if self._store is None else self._store.name

    @property
    def device(self) -> Any:
        """The torch device of the tensors (torch storage), else None."""
        return getattr(self._store, "device", None)

    # -- argument checks -------------------------------------------------------------------------

    def _seq(self, seq_id: Any, name: str = "seq_id", allow_all: bool = False) -> int:
        """A sequence id argument as an int32 (TypeError/ValueError naming it otherwise). Its range
        is llama.cpp's, checked by the core: a unified cache accepts any id below 256 (and answers
        as for an empty sequence), a multi-stream cache ids below n_seq_max; the recorded oracle
        scenarios depend on that."""
        if type(seq_id) is int and _I32_MIN <= seq_id <= _I32_MAX:
            return seq_id
        return _check_int(seq_id, name, _I32_MIN, _I32_MAX)

    # -- buffers -------------------------------------------------------------------------------

    def _layer(self, il: Any) -> int:
        try:
            return self._layer_index[il]
        except (KeyError, TypeError):
            raise ValueError(f"model layer {il!r} is not stored in this cache "
                             f"(layers: {self._layers})") from None

    def k(self, il: int) -> np.ndarray:
        """K of model layer ``il``: ``[n_stream, kv_size, n_embd_k]`` (the cache's own array; a
        torch tensor with torch storage)."""
        l = self._layer(il)
        if not self._k:
            raise _no_tensors("k")
        return self._k[l]

    def v(self, il: int) -> np.ndarray:
        """V of model layer ``il``; ``[n_stream, n_embd_v_max, kv_size]`` when ``v_trans``."""
        l = self._layer(il)
        if not self._v:
            raise _no_tensors("v")
        return self._v[l]

    @property
    def layers(self) -> list[int]:
        """Model layer ids stored in this cache, in cache order (not the layers that reuse them)."""
        return list(self._layers)

    @property
    def reused_layers(self) -> dict[int, int]:
        """``{layer: source layer}`` of the layers that read another layer's K/V (``layer_reuse``);
        they have no buffers and are not in the state bytes."""
        return dict(self._reuse)

    def _check_writes(self, il: int) -> None:
        if il in self._reuse:
            raise ValueError(f"layer {il} reuses the K/V of layer {self._reuse[il]} and stores none; "
                             f"write them through layer {self._reuse[il]}")

    @property
    def v_trans(self) -> bool:
        """Whether V is stored transposed (``[n_stream, n_embd_v_max, kv_size]``)."""
        return self._vt

    def _n_embd_v(self, il: int) -> int:
        return self._ev[self._layer(il)]

    @property
    def ggml_type_k(self) -> GGMLType:
        """The element or block type of K (:class:`llmem.ggml_types.GGMLType`)."""
        return ggml_type(self._type_k)

    @property
    def ggml_type_v(self) -> GGMLType:
        return ggml_type(self._type_v)

    @property
    def state_format(self) -> int:
        """The KV state format ``state_write`` produces: 3 (llama.cpp b11312) or 4 (b11549);
        ``state_read`` reads both."""
        return self._core.state_format

    @property
    def n_rot_k(self) -> int:
        """Size of the model's Hadamard rotation of K (llama.cpp b11549's ``n_rot_k``; 0: none)."""
        return self._core.n_rot_k

    @property
    def n_rot_v(self) -> int:
        return self._core.n_rot_v

    @property
    def type_k(self) -> str:
        """ggml's name of K's type (``"f16"``, ``"q8_0"``...), as llama.cpp's -ctk takes it."""
        return ggml_type(self._type_k).name

    @property
    def type_v(self) -> str:
        return ggml_type(self._type_v).name

    def _n_embd_k(self, il: int) -> int:
        return self._ek[self._layer(il)]

    @property
    def n_stream(self) -> int:
        return self._core.n_stream

    @property
    def rope(self) -> Optional[Rope]:
        return self._rope

    # -- Memory interface ------------------------------------------------------------------------

    @property
    def _pos_source(self) -> Any:
        return self._core

    def init_batch(self, balloc_or_batch: BatchOrAllocator, n_ubatch: int,
                   embd_all: bool = False) -> "KVCacheContext":
        """Split the batch (simple split for one stream, equal-sequential otherwise) and find cells
        for every micro-batch; the cache is unchanged until ``apply()``. Status FAILED_PREPARE
        when it does not fit."""
        if type(n_ubatch) is not int or not 1 <= n_ubatch <= _I32_MAX:
            n_ubatch = _check_int(n_ubatch, "n_ubatch", 1, _I32_MAX)
        self._lock.acquire()
        try:
            balloc = self._allocator_for(balloc_or_batch)
            ctx = KVCacheContext(self, self._core.init_batch(balloc, n_ubatch), self._version)
            if ctx._ctx.status == Status.FAILED_PREPARE:  # no room: ctx.no_room, stats, log
                metrics.plan_failed(self, ctx, balloc, [(self, "kv")])
            return ctx
        finally:
            self._lock.release()

    def decode_step(self, seq_ids: IntsLike, tokens: Optional[IntsLike] = None) -> "KVCacheContext":
        """The decode step in one call: one token for each of ``seq_ids`` (distinct ids; a list of
        ints or an int32 array), at position ``seq_pos_max + 1`` of its sequence, every token an
        output; ``tokens`` (same length) or None. Plans and applies exactly as
        ``init_batch(Batch(token=tokens, seq_id=seq_ids, output=all), n_ubatch=len(seq_ids))``
        followed by ``apply()``, and returns that applied context (``ubatch``, ``k_idxs``,
        ``kq_mask``, ``paged_kv``, ``cpy_k``... work as after ``apply``).

        Raises :class:`LlmemError` when the tokens do not fit, ValueError/TypeError for bad
        arguments (a repeated or out-of-range id, a negative token), changing nothing. With
        per-sequence streams llama.cpp's split puts only consecutive ascending ids in one
        micro-batch; for other ids the step takes the general path: every micro-batch is planned,
        the first is applied, and the context continues with ``next()``/``apply()``.

        The step allocates nothing in the steady state: the compiled context and the k-row array of
        an earlier step are refilled once nothing references them any more (an array or context
        you keep is never touched)."""
        # one compiled call: the lock, the checks, plan, apply, the version, the k rows and the
        # context (register_decode_step.cpp)
        ctx: Optional[KVCacheContext] = _core.kv_decode_step(self, seq_ids, tokens, KVCacheContext)
        if ctx is None:
            with self._lock:
                return cast(KVCacheContext, _decode_step_general(self, seq_ids, tokens))
        return ctx

    @locked
    def init_full(self) -> "KVCacheContext":
        """A context covering every cell (n_kv = size), for sizing compute graphs."""
        return KVCacheContext(self, self._core.init_full())

    @locked
    def init_update(self, optimize: bool = False) -> "KVUpdateContext":
        """Pending stream copies and K-shift; NO_UPDATE if there is nothing to do."""
        return KVUpdateContext(self)

    @locked
    def pending_update(self) -> _storage.KVUpdateOps:
        """The tensor work the next ``init_update().apply()`` stands for, as data: the whole-stream
        copies ``(src, dst)`` in order, then the K-shift of each stream (cells, position deltas)
        with :attr:`rope`. A bookkeeping-only cache's caller runs them on its tensors, then calls
        ``apply()`` (which changes the cells only)."""
        copies = tuple(tuple(c) for c in self._core.pending_copy_list())
        shifts = []
        if self._core.get_has_shift():
            for s in range(self.n_stream):
                c = self._core.cells(s)
                cells = np.flatnonzero((c["pos"] != -1) & (c["shift"] != 0))
                if cells.size:
                    shifts.append(_storage.KShift(s, cells.astype(np.int64), c["shift"][cells].astype(np.int32)))
        return _storage.KVUpdateOps(copies, tuple(shifts), self._rope)

    def _run_update(self) -> None:
        """The tensor work of the pending update on torch storage (before the core's update)."""
        store = self._store
        if store is None or not store.has_tensors:
            return
        ops = self.pending_update()
        if ops.k_shift and (self._rope is None or not self._core.get_can_shift()):
            return  # the core refuses it next, changing nothing
        for src, dst in ops.copies:
            store.copy_stream(src, dst)
        for sh in ops.k_shift:
            store.k_shift(sh, self._rope)

    def _touch(self) -> None:
        """Record a change of the cells (contexts planned before it become stale)."""
        self._version += 1

    @locked
    def clear(self, data: bool = True) -> None:
        self._core.clear(bool(data))
        if data and self._store is not None and self._store.has_tensors:
            self._store.zero()
        self._version += 1

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of ``seq_id`` (-1: of every sequence). Always True."""
        # called after every finished or cancelled request: the lock is taken inline (as in
        # seq_pos_max), not through @locked
        if not (type(seq_id) is int and type(p0) is int and type(p1) is int
                and _I32_MIN <= seq_id <= _I32_MAX and _I32_MIN <= p0 <= _I32_MAX and _I32_MIN <= p1 <= _I32_MAX):
            seq_id, p0, p1 = self._seq(seq_id, allow_all=True), _i32(p0, "p0"), _i32(p1, "p1")
        lock = self._lock
        lock.acquire()
        try:
            removed = self._core.seq_rm(seq_id, p0, p1)
            self._version += 1
            return removed
        finally:
            lock.release()

    @locked
    def seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        """Share the cells of ``seq_id_src`` in [p0, p1) with ``seq_id_dst`` (across streams: the
        whole stream, with the K/V bytes copied by the next update)."""
        self._core.seq_cp(self._seq(seq_id_src, "seq_id_src"), self._seq(seq_id_dst, "seq_id_dst"),
                          _i32(p0, "p0"), _i32(p1, "p1"))
        self._version += 1

    @locked
    def seq_keep(self, seq_id: int) -> None:
        self._core.seq_keep(self._seq(seq_id))
        self._version += 1

    @locked
    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        """Shift positions [p0, p1) of ``seq_id``; K is re-rotated by the next update."""
        self._core.seq_add(self._seq(seq_id), _i32(p0, "p0"), _i32(p1, "p1"), _i32(shift, "shift"))
        self._version += 1

    @locked
    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        self._core.seq_div(self._seq(seq_id), _i32(p0, "p0"), _i32(p1, "p1"), _i32(d, "d"))
        self._version += 1

    # What each sequence operation would raise, raised without changing anything: the composite
    # memories (KVCacheISWA, the hybrids) run every part's check before any part changes.
    def _check_seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> None:
        _i32(p0, "p0"), _i32(p1, "p1")
        self._core.check_seq_rm(self._seq(seq_id, allow_all=True))

    def _check_seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        self._core.check_seq_cp(self._seq(seq_id_src, "seq_id_src"), self._seq(seq_id_dst, "seq_id_dst"),
                                _i32(p0, "p0"), _i32(p1, "p1"))

    def _check_seq_keep(self, seq_id: int) -> None:
        self._core.check_seq_keep(self._seq(seq_id))

    def _check_seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self._core.check_seq_add(self._seq(seq_id), _i32(p0, "p0"), _i32(p1, "p1"), _i32(shift, "shift"))

    def _check_seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        self._core.check_seq_div(self._seq(seq_id), _i32(p0, "p0"), _i32(p1, "p1"), _i32(d, "d"))

    # The position queries are the most frequent calls of a server's loop (one per sequence per
    # step): the lock is taken inline rather than through @locked, which costs them a third.
    def _position(self, query: Any, seq_id: Any) -> int:
        if type(seq_id) is not int or not _I32_MIN <= seq_id <= _I32_MAX:
            seq_id = self._seq(seq_id)
        lock = self._lock
        lock.acquire()
        try:
            return query(seq_id)  # type: ignore[no-any-return]
        finally:
            lock.release()

    def seq_pos_min(self, seq_id: int) -> int:
        return self._position(self._core.seq_pos_min, seq_id)

    def seq_pos_max(self, seq_id: int) -> int:
        return self._position(self._core.seq_pos_max, seq_id)

    def get_can_shift(self) -> bool:
        return self._core.get_can_shift()

    def seq_pos_tok_le(self, seq_id: int, pos: int) -> int:
        """The token of ``seq_id``'s cell at the largest position <= ``pos`` (the highest cell
        among cells at that position), or -1 (``LLAMA_TOKEN_NULL``) when the sequence has none:
        llama.cpp's lookup of the tokens before a micro-batch for n-gram embeddings. The cells keep
        tokens only with ``cell_tokens=True`` (or M-RoPE); otherwise ``LlmemError``."""
        p = _i32(pos, "pos")
        return self._position(lambda s: self._core.seq_pos_tok_le(s, p), seq_id)

    @locked
    def get_has_shift(self) -> bool:
        """True when a position shift is waiting for ``init_update().apply()``."""
        return self._core.get_has_shift()

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes of the K/V buffers (one host buffer type, as llama.cpp's CPU entry; torch storage:
        its device, bookkeeping-only: none)."""
        if self._store is not None:
            return {str(self._store.device).upper(): self._store.nbytes()} if self._store.has_tensors else {}
        return {"CPU": int(self._core.total_bytes())}

    @property
    def size(self) -> int:
        return self._core.size

    @property
    @locked
    def used(self) -> int:
        return self._core.used

    @property
    @locked
    def head(self) -> int:
        return self._core.head(0)

    @locked
    def head_of(self, stream: int) -> int:
        """Search start of one stream."""
        return self._core.head(_check_int(stream, "stream", 0, self.n_stream - 1))

    @property
    def n_seq_max(self) -> int:
        return self._core.n_seq_max

    @locked
    def cells(self) -> Dict[str, Any]:
        """Snapshot of the cell metadata: ``pos`` and ``shift`` ``[n_stream, size]``, ``n_seq``
        (sequences per cell), ``seq_ids`` (per stream, the ids of its cells concatenated in cell
        order), ``seqs`` (per stream, a list of per-cell tuples), ``head`` (per stream)."""
        per = [self._core.cells(s) for s in range(self.n_stream)]
        out = {
            "pos": np.stack([p["pos"] for p in per]),
            "shift": np.stack([p["shift"] for p in per]),
            "n_seq": np.stack([p["n_seq"] for p in per]),
            "seq_ids": [p["seq_ids"] for p in per],
            "head": [p["head"] for p in per],
        }
        seqs = []
        for p in per:
            offs = np.concatenate(([0], np.cumsum(p["n_seq"])))
            ids = p["seq_ids"].tolist()
            seqs.append([tuple(ids[offs[i]:offs[i + 1]]) for i in range(len(p["n_seq"]))])
        out["seqs"] = seqs
        return out

    _STATE_KIND = 1

    def _state_parts(self) -> Any:
        return [self._core], None

    def _state_seq(self, seq_id: Any, flags: Any) -> int:
        """The checked sequence id of a state call (and its flags checked): for the state calls,
        which take the lock themselves rather than through @locked."""
        if type(flags) is not int or flags:
            _check_int(flags, "flags")
        return self._seq(seq_id, allow_all=True)

    def state_write(self, seq_id: int = -1, flags: int = 0) -> bytes:
        """llama.cpp's KV state bytes of the whole cache (-1) or one sequence. A pending K-shift is
        saved as if applied (the K rows match the saved positions). ``STATE_HEADER`` prefixes
        llmem's versioned header. :meth:`state_write_into` writes the same bytes into a buffer
        of the caller's."""
        # the lock taken here rather than by @locked: a one-sequence state of a few cells costs
        # about a microsecond in all
        seq = self._state_seq(seq_id, flags)
        lock = self._lock
        lock.acquire()
        try:
            if self._store is not None:
                data = self._stored_state(seq)
            else:
                data = self._core.state_write(seq)
            return self._with_state_header(data, seq, flags) if flags else data
        finally:
            lock.release()

    @locked
    def state_size(self, seq_id: int = -1, flags: int = 0) -> int:
        """Bytes ``state_write(seq_id, flags)`` returns now (counted, not written)."""
        seq = self._state_seq(seq_id, flags)
        return self._header_size(seq, flags) + self._core.state_size(seq)

    def state_write_into(self, buffer: Any, seq_id: int = -1, flags: int = 0) -> int:
        """``state_write(seq_id, flags)``'s bytes written straight into the start of ``buffer`` (a
        bytearray, numpy uint8 array, mmap, shared memory...; reused, nothing allocated); returns
        their number. TypeError for a read-only or non-contiguous buffer; ValueError naming both
        sizes, nothing written, when it holds fewer than :meth:`state_size` bytes."""
        seq = self._state_seq(seq_id, flags)
        lock = self._lock
        lock.acquire()
        try:
            if self._store is not None:
                data = self._stored_state(seq)
                return _copy_into(buffer, self._with_state_header(data, seq, flags) if flags else data)
            if not flags:
                return self._core.state_write_into(buffer, seq)
            return self._write_into(buffer, seq, flags, self._core.state_size(seq),
                                    lambda view: self._core.state_write_into(view, seq))
        finally:
            lock.release()

    def state_read(self, data: Any, seq_id: int = -1, flags: int = 0) -> None:
        """Restore bytes of ``state_write`` (whole cache, or one sequence into ``seq_id``) from any
        bytes-like object, read in place. On any failure raises :class:`StateError` and leaves
        cells and K/V buffers unchanged."""
        seq = self._state_seq(seq_id, flags)
        lock = self._lock
        lock.acquire()
        try:
            if flags:
                data, flags = self._without_state_header(data, seq, flags)
            if self._store is not None:
                if not self._store.has_tensors:
                    raise _no_tensors("state_read (use state_read_holes)")
                read = self._read_holes(data, seq)
                self._version += 1
                _scatter_state(self, read)
            else:
                self._core.state_read(data, seq)
                self._version += 1
        finally:
            lock.release()

    # -- state bytes through the caller's tensors ----------------------------------------------

    def _pending_shifts(self) -> Optional[Dict[int, np.ndarray]]:
        """{stream: int32 shift per cell} when a K-shift is pending and state bytes hold K rows
        as if it were applied."""
        if not (self._rope is not None and self._core.get_can_shift() and self._core.get_has_shift()):
            return None
        return {s: self._core.cells(s)["shift"] for s in range(self.n_stream)}

    def _write_holes(self, seq: int) -> _storage.StateHoles:
        buf = bytearray(self._core.state_size(seq))
        _, holes, cells = _core.collect_state_holes(lambda: self._core.state_write_into(buf, seq), buf)
        return _storage.StateHoles(buf, _storage.holes_from_log(holes, cells, self._core.address, self._layers,
                                                                self._pending_shifts()))

    def _read_holes(self, data: Any, seq: int) -> _storage.StateHoles:
        copies = tuple(tuple(c) for c in self._core.pending_copy_list())
        view = as_byte_view(data)
        _, holes, cells = _core.collect_state_holes(lambda: self._core.state_read(view, seq), view)
        ran = copies if (seq != -1 and copies and not self._core.pending_copies) else ()
        return _storage.StateHoles(view, _storage.holes_from_log(holes, cells, self._core.address, self._layers),
                                   seq == -1, ran)

    def _stored_state(self, seq: int) -> bytes:
        if not self._store.has_tensors:
            raise _no_tensors("state_write (use state_write_holes)")
        w = self._write_holes(seq)
        _fill_state(self, w.data, w.holes)
        return bytes(w.data)

    def state_write_holes(self, seq_id: int = -1) -> _storage.StateHoles:
        """llama.cpp's KV state bytes of the cells (a ``bytearray``) with every tensor section
        left zero and described by a :class:`~llmem.storage.StateHole` (where, which layer, K or
        V, stream, cells, pending shift): filled from the caller's tensors, the bytes are exactly
        ``state_write``'s. For bookkeeping-only caches (any storage works)."""
        seq = self._state_seq(seq_id, 0)
        with self._lock:
            if self._store is None:  # numpy: the core fills every section itself
                return _storage.StateHoles(bytearray(self._core.state_write(seq)), [])
            return self._write_holes(seq)

    def state_read_holes(self, data: Any, seq_id: int = -1) -> _storage.StateHoles:
        """Restore the cells of state bytes (validated all or nothing, as ``state_read``) and return
        the tensor sections the caller's tensors take: for each :class:`~llmem.storage.StateHole`,
        ``data[offset:offset+nbytes]`` holds the rows of ``cells`` of ``stream``. Run
        ``copies_first`` on the tensors before scattering them. Bookkeeping-only caches."""
        seq = self._state_seq(seq_id, 0)
        with self._lock:
            if self._store is None:
                self._core.state_read(data, seq)
                self._version += 1
                return _storage.StateHoles(data, [])
            read = self._read_holes(data, seq)
            self._version += 1
            return read

    @locked
    def state_clear(self, seq_id: int) -> None:
        """Remove ``seq_id`` (-1: everything) and zero the K/V rows of the cells it alone held
        (numpy storage; torch storage zeroes everything for -1 and leaves freed rows as they are)."""
        seq = self._seq(seq_id, allow_all=True)
        self._core.state_clear(seq)
        if seq == -1 and self._store is not None and self._store.has_tensors:
            self._store.zero()
        self._version += 1

    def __repr__(self) -> str:
        return (f"KVCache(size={self.size}, n_stream={self.n_stream}, layers={len(self._layers)}, "
                f"used={self.used}, n_seq_max={self.n_seq_max})")


class KVCacheContext(MemoryContext):
    """A plan of micro-batches for one :class:`KVCache` (or the full-cache context).

    After ``apply()``: ``n_kv`` cells per stream are visible to attention; ``k_idxs()`` gives the
    row of each ubatch token; ``cpy_k``/``cpy_v`` write the model's K/V rows there; ``get_k`` and
    ``get_v`` are views of the first ``n_kv`` cells; ``kq_mask`` is llama.cpp's mask and
    ``kq_cells`` the same visibility as per-token cell lists.
    """

    __slots__ = ("_cache", "_ctx", "_kidx", "_kidx_at", "_version", "_no_room", "_didx", "_didx_at", "_dtab",
                 "_dtab_key")

    def __init__(self, cache: KVCache, ctx: _core.KVContext, version: Optional[int] = None,
                 k_idxs: Optional[np.ndarray] = None) -> None:
        # decode_step builds this class without calling __init__, filling these slots with the
        # same values (csrc/bindings/register_decode_step.cpp): a slot added here goes there too
        self._cache = cache
        self._ctx = ctx
        # the current micro-batch's k rows once computed (decode_step passes them); _kidx_at is 0
        # while they are valid, -1 once next() moved on
        self._kidx: Optional[np.ndarray] = k_idxs
        self._kidx_at = -1 if k_idxs is None else 0
        self._didx: Any = None  # k_idxs on the storage's device (torch storage)
        self._didx_at = -1
        self._dtab: Any = None  # the last mask / paged table put on the device, and its key
        self._dtab_key: Any = None
        # the cache's version the plan is valid for (None: a full context, valid at any time)
        self._version = version

    def _is_fresh(self) -> bool:
        return self._version is None or self._version == self._cache._version

    def _check_fresh(self, what: str) -> None:
        if self._version is not None and self._version != self._cache._version:
            raise stale_context_error(what)

    def _check_applied(self) -> None:
        if not self._ctx.applied:
            # the planned cells may be live cells of another sequence until apply() frees and
            # claims them (a SWA cache reuses cells outside the window): writing there would
            # change the memory before apply(), the only call that may
            raise LlmemError("call apply() before writing K/V rows or asking for their destinations "
                             "(k_idxs/v_idxs/cpy_k/cpy_v): the current micro-batch is not applied"
                             + (" (a full-cache context has no micro-batch)" if self._version is None else ""))

    def _check_apply(self) -> None:
        if self._version is None:
            return  # a full-cache context: apply() changes nothing
        self._check_fresh("apply")
        ctx = self._ctx
        if ctx.status != Status.SUCCESS or not ctx.has_ubatch:
            raise LlmemError("this memory context has no micro-batch to apply")
        if ctx.applied:
            raise LlmemError("this micro-batch was already applied: call next() first")

    @property
    def status(self) -> Status:
        return self._ctx.status

    def next(self) -> bool:
        self._kidx_at = -1
        return self._ctx.next()

    def apply(self) -> bool:
        """Place the current micro-batch; StaleContextError (nothing changed) when the cache
        changed since the plan was made."""
        cache = self._cache
        cache._lock.acquire()
        try:
            if self._version is None:
                return self._ctx.apply()
            if self._version != cache._version:
                raise stale_context_error("apply")
            applied = self._ctx.apply()
            cache._version += 1
            self._version = cache._version
            return applied
        finally:
            cache._lock.release()

    @property
    def ubatch(self) -> Optional[UBatch]:
        return self._ctx.ubatch if self._ctx.has_ubatch else None

    @property
    def n_kv(self) -> int:
        return self._ctx.n_kv

    @property
    def head(self) -> int:
        """First cell of the current micro-batch's slot."""
        return self._ctx.head

    @property
    def cache(self) -> KVCache:
        return self._cache

    def slot_cells(self) -> np.ndarray:
        """Cell (within its stream) of each token of the current micro-batch."""
        self._check_fresh("slot_cells")
        return self._ctx.slot_cells()

    def k_idxs(self, out: Optional[WritableBuffer] = None, device: Any = None) -> np.ndarray:
        """int64 row of each token in the stacked ``[n_stream * kv_size]`` K rows. With ``out``
        (a writable C-contiguous int64 buffer of ``n_tokens`` values) the rows are written there
        and ``out`` is returned; without, the array is cached per micro-batch. ``device`` (torch
        storage: its device, the only one accepted): a torch tensor there, uploaded from a
        pinned buffer without synchronising the device, cached per micro-batch."""
        if self._kidx_at == 0 and out is None and device is None and self._version == self._cache._version:
            return self._kidx  # type: ignore[return-value]  # set with _kidx_at
        if self._version is not None and self._version != self._cache._version:
            raise stale_context_error("k_idxs")
        self._check_applied()
        if device is not None:
            return cast(np.ndarray, self._device_idxs(device))
        if out is not None:
            return cast(np.ndarray, _core.kv_k_idxs(self._ctx, out))
        self._kidx = cast(np.ndarray, _core.kv_k_idxs(self._ctx, None))
        self._kidx_at = 0
        return self._kidx

    def _torch_store(self, device: Any, what: str) -> Any:
        """The cache's torch storage, ``device`` checked against its device (None: its device)."""
        store = self._cache._store
        if store is None or not store.has_tensors:
            raise TypeError(f"{what}(device=...) needs a cache with torch storage")
        if device is not None and device is not store.device:
            import torch
            try:
                dev = torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device={device!r} is not a torch device: {e}") from None
            if dev != store.device and not (dev.type == store.device.type and dev.index is None):
                raise ValueError(f"device={device!r}: this cache's tensors are on {store.device}")
        return store

    def _device_table(self, key: Any, what: str, shape: Any, dtype: Any,
                      write: Callable[[np.ndarray], Any]) -> Any:
        """A mask or paged table on the storage's device, filled on the host through ``write``
        into a pinned buffer and uploaded without synchronising the device; the last one is kept
        for the same micro-batch and arguments (asked for every layer)."""
        key = (self._ctx.i_cur, self._version, what) + key
        if self._dtab_key == key:
            return self._dtab
        self._dtab = self._cache._store.uploader(what).fill(shape, dtype, write)
        self._dtab_key = key
        return self._dtab

    def _device_idxs(self, device: Any = None) -> Any:
        store = self._torch_store(device, "k_idxs")
        i = self._ctx.i_cur
        if self._didx_at != i:
            self._didx = store.upload(self.k_idxs())
            self._didx_at = i
        return self._didx

    def v_idxs(self, out: Optional[WritableBuffer] = None) -> np.ndarray:
        """V destinations: as ``k_idxs`` without ``v_trans``; with it, the flat element index of
        (token, feature j < n_embd_v_max) in the stacked ``[n_stream, n_embd_v_max, kv_size]`` V,
        token-major (length ``n_tokens * n_embd_v_max``). ``out``: an int64 buffer of that length."""
        if out is None and not self._cache._vt:
            if self._kidx_at == 0 and self._version == self._cache._version:
                return self._kidx  # type: ignore[return-value]  # set with _kidx_at
            return self.k_idxs()
        self._check_fresh("v_idxs")
        self._check_applied()
        return cast(np.ndarray, _core.kv_v_idxs(self._ctx, out))

    def kq_mask(self, causal: bool = True, out: Optional[WritableBuffer] = None, dtype: npt.DTypeLike = np.float32,
                pad: int = 1, device: Any = None) -> np.ndarray:
        """llama.cpp's KQ mask of the current micro-batch: 0 where a token attends a cell, -inf
        elsewhere, shape ``[n_groups * rows, n_kv]`` (``n_groups``: 1 for a unified cache, else the
        micro-batch's sequences, one stream each; ``rows``: the tokens of a group, rounded up to a
        multiple of ``pad`` with -inf rows; ``pad=1`` is llama.cpp 0.3.36's unpadded
        ``[n_kv, n_tokens/n_groups, 1, n_groups]``). ``dtype`` float32 or float16 (llama.cpp's
        mask under flash attention). ``out``: a writable C-contiguous buffer of that dtype and
        shape (or raw bytes of its size) written in place and returned: no allocation per step.
        Costs O(n_tokens x n_kv) writes; large fills release the GIL.

        ``device`` (torch storage: its device): the mask as a torch tensor there (torch.float32 or
        float16), filled into a reused pinned buffer and uploaded into a reused device buffer
        without synchronising the device; the same tensor is returned again for the same
        micro-batch and arguments. It stays valid for the work queued before the cache's next two
        mask uploads: take it per step, do not keep it. On the CPU it is a new tensor."""
        # the usual arguments checked without a call (a mask is asked for every layer and step)
        f16 = False if dtype is np.float32 else True if dtype is np.float16 else _mask_f16(dtype)
        if type(pad) is not int or not 1 <= pad <= _I32_MAX:
            pad = _check_int(pad, "pad", 1, _I32_MAX)
        causal = causal is True or bool(causal)
        if device is not None:
            self._torch_store(device, "kq_mask")
            if out is not None:
                raise ValueError("kq_mask: give out= (a host buffer) or device=, not both")
        lock = self._cache._lock
        lock.acquire()
        try:
            if self._version is not None and self._version != self._cache._version:
                raise stale_context_error("kq_mask")
            ctx = self._ctx
            if device is not None and ctx.has_ubatch and ctx.applied:
                ub = ctx.ubatch
                n_groups = 1 if self._cache.n_stream == 1 else max(1, ub.n_seqs_unq)
                rows = -(-(ub.n_tokens // n_groups) // pad) * pad
                return cast(np.ndarray, self._device_table(
                    (causal, f16, pad), "mask", (n_groups * rows, ctx.n_kv), np.float16 if f16 else np.float32,
                    lambda host: _core.kv_kq_mask(ctx, causal, host, f16, pad)))
            # (no applied micro-batch: the core raises its error for the device form too)
            return cast(np.ndarray, _core.kv_kq_mask(ctx, causal, out, f16, pad))
        finally:
            lock.release()

    def kq_cells(self, causal: bool = True,
                 out: Optional[Sequence[WritableBuffer]] = None) -> tuple[np.ndarray, np.ndarray]:
        """The mask as lists: token ``t`` attends cells ``cells[offsets[t]:offsets[t+1]]``
        (ascending, within the token's stream). Returns ``(offsets int64[n_tokens+1], cells int32)``.
        ``out=(offsets, cells)``: buffers to fill, ``offsets`` of exactly ``n_tokens + 1`` int64,
        ``cells`` a 1-D int32 buffer with room for every entry; the used part of ``cells`` is
        returned as a view."""
        if out is None:
            offs_buf = cells_buf = None
        else:
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise TypeError("out must be a pair (offsets, cells) of buffers, got "
                                f"{type(out).__name__}")
            offs_buf, cells_buf = out
        self._cache._lock.acquire()
        try:
            self._check_fresh("kq_cells")
            return cast("tuple[np.ndarray, np.ndarray]",
                        _core.kv_kq_cells(self._ctx, bool(causal), offs_buf, cells_buf))
        finally:
            self._cache._lock.release()

    def paged_kv(self, causal: bool = True, out: Optional["PagedKV"] = None, device: Any = None) -> "PagedKV":
        """The current micro-batch's attention in paged form (page size 1: one cell), as paged
        attention kernels (FlashInfer, FlashAttention varlen) take it; see :class:`PagedKV`.
        Costs O(cells attended + n_tokens log). ``out``: a :class:`PagedKV` of buffers with room
        enough (``PagedKV.empty``), filled in place; the result holds views of their used parts.
        ``device`` (torch storage: its device): the arrays as int32 torch tensors there, views of
        one buffer uploaded as ``kq_mask(device=...)`` uploads (same reuse and lifetime)."""
        if device is not None:
            self._torch_store(device, "paged_kv")
            if out is not None:
                raise ValueError("paged_kv: give out= (host buffers) or device=, not both")
        self._cache._lock.acquire()
        try:
            self._check_fresh("paged_kv")
            host = PagedKV(*_core.kv_paged(self._ctx, bool(causal), out))
            if device is None:
                return host
            sizes = [len(a) for a in host]
            ends = np.cumsum(sizes).tolist()

            def write(buf: np.ndarray) -> None:
                np.concatenate(host, out=buf)

            flat = self._device_table((bool(causal),), "paged", (ends[-1],), np.int32, write)
            return PagedKV(*[flat[e - n:e] for n, e in zip(sizes, ends)])
        finally:
            self._cache._lock.release()

    def cpy_k(self, il: int, k_cur: "npt.ArrayLike") -> None:
        """Store the current micro-batch's K rows (``[n_tokens, n_embd_k]`` or
        ``[n_tokens, n_head, head_dim]``) of model layer ``il`` into its cells."""
        c = self._cache
        c._lock.acquire()
        try:
            c._check_writes(il)
            if c._store is not None:
                l = c._layer(il)
                _store_of(c).cpy_k(l, self._device_idxs(), k_cur, c._ek[l])
                return
            K = c.k(il)
            idx = self.k_idxs()
            tk = c.ggml_type_k
            if tk.quantized:  # rows quantized straight into their cells (ggml's reference quantizer)
                vals = _float_rows(_rows(k_cur, len(idx), c._n_embd_k(il), "k_cur"), "k_cur")
                _core.quantize_scatter(tk.id, K.reshape(-1, K.shape[2]), vals, idx)
                return
            vals = _to_storage(_rows(k_cur, len(idx), K.shape[2], "k_cur"), c._type_k, "k_cur")
            K.reshape(-1, K.shape[2])[idx] = vals
        finally:
            c._lock.release()

    def cpy_v(self, il: int, v_cur: "npt.ArrayLike") -> None:
        """Store the current micro-batch's V rows (``[n_tokens, n_embd_v]``) of model layer ``il``."""
        c = self._cache
        c._lock.acquire()
        try:
            c._check_writes(il)
            if c._store is not None:
                l = c._layer(il)
                _store_of(c).cpy_v(l, self._device_idxs(), v_cur, c._ev[l])
                return
            V = c.v(il)
            idx = self.k_idxs()
            ne = c._n_embd_v(il)
            tv = c.ggml_type_v
            if tv.quantized:  # never transposed (the constructor refuses it)
                vals = _float_rows(_rows(v_cur, len(idx), ne, "v_cur"), "v_cur")
                _core.quantize_scatter(tv.id, V.reshape(-1, V.shape[2]), vals, idx)
                return
            vals = _to_storage(_rows(v_cur, len(idx), ne, "v_cur"), c._type_v, "v_cur")
            if c._vt:
                vals = np.ascontiguousarray(vals, dtype=V.dtype)
                _core.kv_scatter_v_trans(V, vals, idx, c.size, V.shape[0])
            else:
                V.reshape(-1, V.shape[2])[idx] = vals
        finally:
            c._lock.release()

    def _streams(self) -> slice:
        self._check_fresh("get_k/get_v")
        if self.n_kv == 0:
            raise LlmemError("call apply() before reading the cache through a context")
        return slice(self._ctx.s0, self._ctx.s1 + 1)

    def get_k(self, il: int) -> np.ndarray:
        """View ``[n_streams, n_kv, n_embd_k]`` of the streams of this micro-batch."""
        return self._cache.k(il)[self._streams(), :self.n_kv]

    def get_v(self, il: int) -> np.ndarray:
        """View of V over the first ``n_kv`` cells (``[ns, n_embd_v_max, n_kv]`` when ``v_trans``)."""
        V = self._cache.v(il)
        s = self._streams()
        if self._cache._vt:
            return V[s, :, :self.n_kv]
        return V[s, :self.n_kv]

    def get_k_float(self, il: int) -> np.ndarray:
        """K of the first ``n_kv`` cells as float32 ``[n_streams, n_kv, n_embd_k]``, whatever the
        cache stores (block types dequantized as ggml does; a new array)."""
        c = self._cache
        c._lock.acquire()
        try:
            if c._store is not None:
                return self.get_k(il).float()  # type: ignore[no-any-return,attr-defined]
            return dequantize(self.get_k(il), c.ggml_type_k, c._n_embd_k(il))
        finally:
            c._lock.release()

    def get_v_float(self, il: int) -> np.ndarray:
        """V of the first ``n_kv`` cells as float32: ``[n_streams, n_kv, n_embd_v]``, or
        ``[n_streams, n_embd_v_max, n_kv]`` when ``v_trans`` (float types only)."""
        c = self._cache
        c._lock.acquire()
        try:
            V = self.get_v(il)
            if c._store is not None:
                return V.float()  # type: ignore[no-any-return,attr-defined]
            if c._vt:
                return dequantize(V, c.ggml_type_v)
            return dequantize(V, c.ggml_type_v, c._n_embd_v(il))
        finally:
            c._lock.release()


def _mask_f16(dtype: npt.DTypeLike) -> bool:
    """Whether a mask dtype argument asks for float16 (TypeError for anything but float32/16)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float16, got {dtype!r}") from None
    if dt == np.float32:
        return False
    if dt == np.float16:
        return True
    raise TypeError(f"dtype must be float32 or float16, got {dt}")


class PagedKV(NamedTuple):
    """A micro-batch's attention in paged form (page size 1: a page is one cell), for paged
    attention kernels. Requests are the distinct sequences of the micro-batch in order of their
    first token; all arrays are int32.

    * ``seq_ids[r]``: the sequence of request ``r``;
    * ``kv_indptr`` / ``kv_indices`` / ``kv_last_page_len``: request ``r``'s page table (CSR), the
      cells it attends in *position order* as global K rows (``stream * kv_size + cell``, as
      ``k_idxs``), and 1 per non-empty table (0 for an empty one);
    * ``qo_seq[t]``: the request of ubatch token ``t`` (the query-to-sequence map);
      ``qo_indptr`` / ``qo_order``: the tokens of request ``r`` are
      ``qo_order[qo_indptr[r]:qo_indptr[r+1]]`` (ubatch order; ``qo_order`` is the identity when
      each sequence's tokens are consecutive, as in every per-stream and decode-step micro-batch);
    * ``kv_start[t]``, ``kv_end[t]``: token ``t`` attends exactly the pages
      ``kv_indices[kv_start[t]:kv_end[t]]`` of its request.

    Why per-token slices: within one prefill chunk, tokens of a sequence see different cells (the
    causal limit and, on sliding-window layers, the window's lower end). Since a request's pages
    are in position order, each token's visible cells are one contiguous slice of them, so two
    int32 per token express any causal/SWA (standard, chunked, symmetric) mask exactly, also where
    positions have gaps or repeats (after ``seq_rm``/``seq_add``/``seq_cp``), where the
    "last qo_len pages" convention of FlashInfer's ``causal=True`` would not. When a request's
    positions are contiguous and it has no window, ``kv_start`` is ``kv_indptr[r]`` and ``kv_end``
    grows by one per token, i.e. FlashInfer's causal form. Each sliding-window layer type has its
    own table (``KVCacheISWAContext.paged_kv(il)``). Not available for the causal mask of 2-D
    (M-RoPE image) micro-batches.
    """

    seq_ids: np.ndarray
    qo_seq: np.ndarray
    qo_indptr: np.ndarray
    qo_order: np.ndarray
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    kv_last_page_len: np.ndarray
    kv_start: np.ndarray
    kv_end: np.ndarray

    @classmethod
    def empty(cls, max_tokens: int, max_seqs: int, max_pages: int) -> "PagedKV":
        """Buffers to pass as ``out=``, reused every step (each a 1-D int32 array)."""
        t = _check_int(max_tokens, "max_tokens")
        s = _check_int(max_seqs, "max_seqs")
        p = _check_int(max_pages, "max_pages")
        z: Callable[[int], np.ndarray] = lambda n: np.zeros(n, np.int32)  # noqa: E731
        return cls(z(s), z(t), z(s + 1), z(t), z(s + 1), z(p), z(s), z(t), z(t))


class KVUpdateContext(MemoryContext):
    """Pending work of a KV cache: whole-stream copies left by ``seq_cp`` across streams, then the
    K-shift (RoPE re-rotation of shifted cells), then the shifts are cleared."""

    __slots__ = ("_caches", "_status", "_ops_seen")

    def __init__(self, *caches: KVCache) -> None:
        self._caches = caches
        self._ops_seen = False  # they share one lock (the caches of one iSWA pair)
        pending = any(c._core.update_pending() for c in caches)
        self._status = Status.SUCCESS if pending else Status.NO_UPDATE

    @property
    def status(self) -> Status:
        return self._status

    def next(self) -> bool:
        return False

    def ops(self) -> List[_storage.KVUpdateOps]:
        """The tensor work of ``apply()`` per cache (one, or base and swa of an iSWA cache), as
        data (:meth:`KVCache.pending_update`): the caller of a bookkeeping-only cache runs it on
        its tensors before ``apply()``."""
        self._ops_seen = True
        return [c.pending_update() for c in self._caches]

    def _check_apply(self) -> None:
        for c in self._caches:
            if c.get_has_shift() and c._rope is None:
                raise LlmemError("cannot apply a K-shift: positions were shifted (seq_add/seq_div) but "
                                 "the cache was built without rope=...")
            if (c._store is not None and not c._store.has_tensors and not self._ops_seen
                    and c._core.update_pending()):
                raise LlmemError("a bookkeeping-only cache's update changes tensors llmem does not hold: "
                                 "take ctx.ops() (stream copies, K-shift) and run them on your tensors "
                                 "before apply()")

    def apply(self) -> bool:
        self._caches[0]._lock.acquire()
        try:
            # Check every cache first so a refused shift changes none of them.
            self._check_apply()
            for c in self._caches:
                shifted = metrics.logger.isEnabledFor(logging.INFO) and c.get_has_shift()
                c._run_update()
                c._core.update()
                c._version += 1
                if shifted:
                    metrics.logger.info("K-shift applied: shifted positions of %s re-rotated (%d cells in use)",
                                        type(c).__name__, c.used)
            return True
        finally:
            self._caches[0]._lock.release()

    @property
    def ubatch(self) -> None:
        return None


_TORCH_NAMES = {"torch.float32": "f32", "torch.float16": "f16", "torch.bfloat16": "bf16"}


class _NoTensors:
    """The storage of a bookkeeping-only cache: it holds nothing."""

    name = "none"
    has_tensors = False
    device = None

    def __getattr__(self, op: str) -> Any:
        raise _no_tensors(op)


def _no_tensors(op: str) -> LlmemError:
    return LlmemError(f"{op}: this cache is bookkeeping-only (storage=None) and holds no K/V tensors; the "
                      "caller's tensors take the K/V rows at k_idxs()/v_idxs() (docs/storage.md)")


def _store_of(cache: KVCache) -> Any:
    store = cache._store
    if not store.has_tensors:
        raise _no_tensors("cpy_k/cpy_v")
    return store


def _fill_state(cache: KVCache, out: Any, holes: List[_storage.StateHole]) -> None:
    cache._store.fill(out, [(h, cache._layer_index[h.layer]) for h in holes], cache._rope)


def _scatter_state(cache: KVCache, read: _storage.StateHoles) -> None:
    store = cache._store
    if read.clear_first:
        store.zero()
    for src, dst in read.copies_first:
        store.copy_stream(src, dst)
    store.scatter(read.data, [(h, cache._layer_index[h.layer]) for h in read.holes])


def _copy_into(buffer: Any, data: bytes) -> int:
    """state_write_into of bytes made already (storages whose sections come from device tensors)."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise TypeError(f"buffer must be a writable bytes-like object, not {type(buffer).__name__}") from None
    if view.readonly or not view.c_contiguous:
        raise TypeError("buffer must be a writable, C-contiguous bytes-like object")
    out = view.cast("B")
    if len(out) < len(data):
        raise ValueError(f"state_write_into: the buffer holds {len(out)} bytes, the state needs {len(data)}")
    out[:len(data)] = data
    return len(data)


def _split_storage(spec: Any, swa_flags: List[bool]) -> "tuple[Any, Any]":
    """The storage of an iSWA cache's base and swa parts (tensors of the caller's go to the part
    that stores their layer)."""
    buffers = getattr(spec, "buffers", None)
    if not buffers:
        return spec, spec
    from .storage.torch_storage import TorchStorage
    dev = spec.resolved_device()
    base = {il: b for il, b in buffers.items() if not (0 <= il < len(swa_flags) and swa_flags[il])}
    swa = {il: b for il, b in buffers.items() if 0 <= il < len(swa_flags) and swa_flags[il]}
    return TorchStorage(device=dev, buffers=base), TorchStorage(device=dev, buffers=swa)


def _rows(values: Any, n_tokens: int, width: int, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim < 2 or a.shape[0] != n_tokens or a.size != n_tokens * width:
        raise ValueError(f"{name} must have shape [n_tokens={n_tokens}, {width}] "
                         f"(or [n_tokens, n_head, head_dim]), got {a.shape}")
    return a.reshape(n_tokens, width)


def _no_room(seq_ids: IntsLike) -> LlmemError:
    return LlmemError(f"decode_step: no room for one token of each of the {len(seq_ids)} sequences; "
                      "the memory is unchanged (free cells with seq_rm, or use a larger cache)")


def _decode_step_args(seq_ids: IntsLike, tokens: Optional[IntsLike],
                      n_seq_max: int) -> "tuple[npt.NDArray[np.int32], Optional[npt.NDArray[np.int32]]]":
    """decode_step's arguments as int32 arrays, checked as the compiled step checks them."""
    def as_ids(value: IntsLike, name: str) -> "npt.NDArray[np.int32]":
        a = np.asarray(value)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu") or a.dtype == np.bool_:
            raise TypeError(f"{name} must be a 1-D sequence of ints, got {value!r}")
        if a.size and (a.min() < _I32_MIN or a.max() > _I32_MAX):
            raise ValueError(f"{name} has values that do not fit in int32")
        return a.astype(np.int32)
    ids = as_ids(seq_ids, "seq_ids")
    if ids.size == 0:
        raise ValueError("decode_step: at least one sequence is needed, got seq_ids = []")
    bad = np.flatnonzero((ids < 0) | (ids >= n_seq_max))
    if bad.size:
        k = int(bad[0])
        raise ValueError(f"decode_step: seq_ids[{k}] = {ids[k]} is outside [0, {n_seq_max})")
    if np.unique(ids).size != ids.size:
        raise ValueError("decode_step: seq_ids repeats a sequence: a decode step takes one token of each sequence")
    if tokens is None:
        return ids, None
    tok = as_ids(tokens, "tokens")
    if tok.size != ids.size:
        raise ValueError(f"tokens has {tok.size} entries, seq_ids {ids.size}: one token per sequence")
    if (tok < 0).any():
        raise ValueError("decode_step: tokens has a negative value")
    return ids, tok


def _decode_step_general(mem: Memory, seq_ids: IntsLike, tokens: Optional[IntsLike]) -> MemoryContext:
    """decode_step through init_batch + apply: where llama.cpp's split gives several micro-batches
    (per-sequence streams, ids not consecutive and ascending)."""
    ids, tok = _decode_step_args(seq_ids, tokens, mem.n_seq_max)
    # without tokens: token ids 0 (the allocator refuses a batch without token ids or embeddings;
    # the C API's decode_step does the same)
    tok = np.zeros(len(ids), np.int32) if tok is None else tok
    batch = Batch(token=tok, seq_id=ids, output=np.ones(len(ids), dtype=bool))
    ctx = mem.init_batch(batch, len(ids))
    if ctx.status != Status.SUCCESS:
        raise _no_room(seq_ids)
    ctx.apply()
    return ctx


class KVCacheISWA(Memory):
    """llama.cpp's iSWA cache: a *base* cache for full-attention layers and a *swa* cache for
    sliding-window layers (``is_swa_layer(il)``), sized
    ``roundup(min(kv_size, n_swa * (n_seq_max if unified else 1) + n_ubatch), 256)`` unless
    ``swa_full``. Sequence operations go to both; positions are reported by the swa cache."""

    __slots__ = ("base", "swa", "_own_balloc", "_lock")

    def __init__(self, n_layer: int, n_embd_k_gqa: Union[int, Sequence[int]],
                 n_embd_v_gqa: Union[int, Sequence[int]], kv_size: int, n_seq_max: int = 1,
                 dtype_k: "npt.DTypeLike" = np.float16, dtype_v: "npt.DTypeLike" = np.float16,
                 v_trans: bool = True, unified: bool = True, n_pad: int = 1, n_swa: int = 0,
                 swa_type: Union[SWAType, int] = SWAType.STANDARD, swa_full: bool = False,
                 is_swa_layer: Union[Callable[[int], bool], Sequence[bool], None] = None,
                 n_ubatch: int = 512, layer_filter: Optional[Callable[[int], bool]] = None,
                 rope: Optional[Rope] = None, rope_swa: Optional[Rope] = None,
                 n_pos_per_embd: int = 1, compat: Any = None,
                 state_format: Optional[int] = None, n_rot_k: int = 0, n_rot_v: int = 0,
                 layer_reuse: Union[Callable[[int], int], Sequence[int], None] = None,
                 storage: Any = "numpy", device: Any = None) -> None:
        n_layer = _check_int(n_layer, "n_layer", 0, MAX_LAYERS)
        kv_size = _check_int(kv_size, "kv_size", 1)
        n_seq_max = _check_int(n_seq_max, "n_seq_max", 1, _SEQ_MAX_LIMIT)
        n_swa = _check_int(n_swa, "n_swa", 1)
        n_ubatch = _check_int(n_ubatch, "n_ubatch", 1, _I32_MAX)
        if SWAType(swa_type) == SWAType.NONE:
            raise ValueError("an iSWA cache needs swa_type other than NONE")
        if is_swa_layer is None:
            raise ValueError("is_swa_layer is required (callable il -> bool, or a list of bools)")
        if callable(is_swa_layer):
            flags = [bool(is_swa_layer(il)) for il in range(n_layer)]
        else:
            if not isinstance(is_swa_layer, (list, tuple, np.ndarray)):
                raise TypeError("is_swa_layer must be a callable il -> bool or a list of bools, got "
                                f"{type(is_swa_layer).__name__} {is_swa_layer!r}")
            flags = [bool(f) for f in is_swa_layer]
            if len(flags) != n_layer:
                raise ValueError(f"is_swa_layer has {len(flags)} entries, expected n_layer = {n_layer}")
        keep = (lambda il: True) if layer_filter is None else layer_filter
        if swa_full:
            size_swa = kv_size
        else:
            size_swa = min(kv_size, n_swa * (n_seq_max if unified else 1) + n_ubatch)
            size_swa = (size_swa + 255) // 256 * 256
        common: Dict[str, Any] = dict(n_seq_max=n_seq_max, dtype_k=dtype_k, dtype_v=dtype_v,
                                      v_trans=v_trans, unified=unified, n_pad=n_pad,
                                      n_pos_per_embd=n_pos_per_embd, compat=compat,
                                      state_format=state_format, n_rot_k=n_rot_k, n_rot_v=n_rot_v,
                                      layer_reuse=layer_reuse)
        self._own_balloc = None
        spec = _storage.resolve_storage(storage, device)
        base_spec, swa_spec = _split_storage(spec, flags)
        self.base: KVCache = KVCache(n_layer, n_embd_k_gqa, n_embd_v_gqa, kv_size,
                            layer_filter=lambda il: not flags[il] and keep(il), rope=rope, storage=base_spec,
                            **common)
        self.swa: KVCache = KVCache(n_layer, n_embd_k_gqa, n_embd_v_gqa, size_swa, n_swa=n_swa,
                           swa_type=swa_type, layer_filter=lambda il: flags[il] and keep(il),
                           rope=rope if rope_swa is None else rope_swa, storage=swa_spec, **common)
        self._share_lock(new_lock())

    def _share_lock(self, lock: Any) -> None:
        self._lock = lock
        self.base._share_lock(lock)
        self.swa._share_lock(lock)

    @property
    def storage(self) -> str:
        """``"numpy"``, ``"torch"`` or ``"none"`` (both parts alike)."""
        return self.base.storage

    @property
    def device(self) -> Any:
        """The torch device of the tensors (torch storage), else None."""
        return self.base.device

    def _touch(self) -> None:
        self.base._touch()
        self.swa._touch()

    def _cache_of(self, il: int) -> KVCache:
        if il in self.base._layer_index:
            return self.base
        if il in self.swa._layer_index:
            return self.swa
        raise ValueError(f"model layer {il!r} is not stored in this cache")

    @property
    def layers(self) -> list[int]:
        """Model layer ids stored in either cache, ascending."""
        return sorted(self.base.layers + self.swa.layers)

    def k(self, il: int) -> np.ndarray:
        return self._cache_of(il).k(il)

    def v(self, il: int) -> np.ndarray:
        return self._cache_of(il).v(il)

    @property
    def _pos_source(self) -> Any:
        return self.swa._core

    def init_batch(self, balloc_or_batch: BatchOrAllocator, n_ubatch: int,
                   embd_all: bool = False) -> "KVCacheISWAContext":
        """llama.cpp's order: simple split placed in both caches (unified only), else the equal
        split; FAILED_PREPARE when neither fits."""
        if type(n_ubatch) is not int or not 1 <= n_ubatch <= _I32_MAX:
            n_ubatch = _check_int(n_ubatch, "n_ubatch", 1, _I32_MAX)
        self._lock.acquire()
        try:
            balloc = self._allocator_for(balloc_or_batch)
            cb, cs = _core.kv_iswa_init_batch(self.base._core, self.swa._core, balloc, n_ubatch)
            ctx = KVCacheISWAContext(self, KVCacheContext(self.base, cb, self.base._version),
                                     KVCacheContext(self.swa, cs, self.swa._version))
            if cb.status == Status.FAILED_PREPARE:  # no room: ctx.no_room, stats, log
                metrics.plan_failed(self, ctx, balloc, [(self.base, "kv"), (self.swa, "kv_swa")])
            return ctx
        finally:
            self._lock.release()

    def decode_step(self, seq_ids: IntsLike, tokens: Optional[IntsLike] = None) -> "KVCacheISWAContext":
        """The decode step in one call on both caches, as :meth:`KVCache.decode_step` (the same
        decisions as ``init_batch`` + ``apply``, llama.cpp's order of split attempts)."""
        ctx: Optional[KVCacheISWAContext] = _core.kv_iswa_decode_step(self, seq_ids, tokens, KVCacheContext,
                                                                      KVCacheISWAContext)
        if ctx is None:
            with self._lock:
                return cast(KVCacheISWAContext, _decode_step_general(self, seq_ids, tokens))
        return ctx

    @locked
    def init_full(self) -> "KVCacheISWAContext":
        return KVCacheISWAContext(self, self.base.init_full(), self.swa.init_full())

    @locked
    def init_update(self, optimize: bool = False) -> KVUpdateContext:
        return KVUpdateContext(self.base, self.swa)

    @locked
    def clear(self, data: bool = True) -> None:
        self.base.clear(data)
        self.swa.clear(data)

    # Every operation runs both caches' checks before either changes: the caches can hold
    # different positions for a sequence (after a PARTIAL_ONLY read), so a shift may overflow in
    # one only, and the smaller swa cache has the stricter cross-stream seq_cp rule.
    def _check_seq_rm(self, *args: int) -> None:
        self.base._check_seq_rm(*args)
        self.swa._check_seq_rm(*args)

    def _check_seq_cp(self, *args: int) -> None:
        self.base._check_seq_cp(*args)
        self.swa._check_seq_cp(*args)

    def _check_seq_keep(self, *args: int) -> None:
        self.base._check_seq_keep(*args)
        self.swa._check_seq_keep(*args)

    def _check_seq_add(self, *args: int) -> None:
        self.base._check_seq_add(*args)
        self.swa._check_seq_add(*args)

    def _check_seq_div(self, *args: int) -> None:
        self.base._check_seq_div(*args)
        self.swa._check_seq_div(*args)

    @locked
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        self._check_seq_rm(seq_id, p0, p1)
        a = self.base.seq_rm(seq_id, p0, p1)
        b = self.swa.seq_rm(seq_id, p0, p1)
        return a and b

    @locked
    def seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        self._check_seq_cp(seq_id_src, seq_id_dst, p0, p1)
        self.base.seq_cp(seq_id_src, seq_id_dst, p0, p1)
        self.swa.seq_cp(seq_id_src, seq_id_dst, p0, p1)

    @locked
    def seq_keep(self, seq_id: int) -> None:
        self._check_seq_keep(seq_id)
        self.base.seq_keep(seq_id)
        self.swa.seq_keep(seq_id)

    @locked
    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self._check_seq_add(seq_id, p0, p1, shift)
        self.base.seq_add(seq_id, p0, p1, shift)
        self.swa.seq_add(seq_id, p0, p1, shift)

    @locked
    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        self._check_seq_div(seq_id, p0, p1, d)
        self.base.seq_div(seq_id, p0, p1, d)
        self.swa.seq_div(seq_id, p0, p1, d)

    @locked
    def seq_pos_min(self, seq_id: int) -> int:
        return self.swa.seq_pos_min(seq_id)

    @locked
    def seq_pos_max(self, seq_id: int) -> int:
        return self.swa.seq_pos_max(seq_id)

    def get_can_shift(self) -> bool:
        return (self.base.get_can_shift() and self.swa.get_can_shift()
                and self.base.size == self.swa.size)

    @locked
    def memory_breakdown(self) -> dict[str, int]:
        out = dict(self.base.memory_breakdown())
        for k, v in self.swa.memory_breakdown().items():
            out[k] = out.get(k, 0) + v
        return out

    @property
    def size(self) -> int:
        return self.base.size

    @property
    def used(self) -> int:
        return self.base.used

    @property
    def head(self) -> int:
        return self.base.head

    @property
    def n_seq_max(self) -> int:
        return self.base.n_seq_max

    @locked
    def cells(self) -> Dict[str, Any]:
        return {"base": self.base.cells(), "swa": self.swa.cells()}

    _STATE_KIND = 2

    def _state_parts(self) -> Any:
        return [self.base._core, self.swa._core], None

    @locked
    def state_write(self, seq_id: int = -1, flags: int = 0) -> bytes:
        """Base section (unless ``STATE_PARTIAL_ONLY``) then swa section (after llmem's
        versioned header with ``STATE_HEADER``)."""
        flags = _check_int(flags, "flags")
        swa = self.swa.state_write(seq_id)
        if flags & STATE_PARTIAL_ONLY:
            return self._with_state_header(swa, seq_id, flags)
        return self._with_state_header(self.base.state_write(seq_id) + swa, seq_id, flags)

    @locked
    def state_size(self, seq_id: int = -1, flags: int = 0) -> int:
        """Bytes ``state_write(seq_id, flags)`` returns now (counted, not written)."""
        flags = _check_int(flags, "flags")
        seq = self.base._seq(seq_id, allow_all=True)
        return self._header_size(seq, flags) + sum(int(c.state_size(seq)) for c in self._state_cores(flags))

    @locked
    def state_write_into(self, buffer: Any, seq_id: int = -1, flags: int = 0) -> int:
        """``state_write(seq_id, flags)``'s bytes written straight into the start of ``buffer``;
        returns their number (errors as :meth:`KVCache.state_write_into`)."""
        flags = _check_int(flags, "flags")
        seq = self.base._seq(seq_id, allow_all=True)
        cores = self._state_cores(flags)
        if self.base._store is not None:  # the sections come from the storage's tensors
            return _copy_into(buffer, self.state_write(seq_id, flags))

        def sections(view: Any) -> Any:
            at = 0
            for core in cores:
                at += core.state_write_into(view[at:], seq)
            return at
        return self._write_into(buffer, seq, flags, sum(c.state_size(seq) for c in cores), sections)

    def _state_cores(self, flags: int) -> List[Any]:
        return [self.swa._core] if flags & STATE_PARTIAL_ONLY else [self.base._core, self.swa._core]

    def state_read(self, data: Any, seq_id: int = -1, flags: int = 0) -> None:
        """All or nothing across both sections (llama.cpp keeps a restored base when the swa
        section fails)."""
        flags = _check_int(flags, "flags")
        data, flags = self._without_state_header(data, seq_id, flags)
        cores = [self.swa._core] if flags & STATE_PARTIAL_ONLY else [self.base._core, self.swa._core]
        self._lock.acquire()
        try:
            seq = self.base._seq(seq_id, allow_all=True)
            if self.base._store is None:
                _core.kv_state_read(cores, as_byte_view(data), seq)
                self._touch()
                return
            if not self.base._store.has_tensors:
                raise _no_tensors("state_read")
            caches = [self.swa] if flags & STATE_PARTIAL_ONLY else [self.base, self.swa]
            view = as_byte_view(data)
            copies = [tuple(tuple(c) for c in k._core.pending_copy_list()) for k in caches]
            _, holes, cells = _core.collect_state_holes(lambda: _core.kv_state_read(cores, view, seq), view)
            self._touch()
            for k, cp in zip(caches, copies):
                ran = cp if (seq != -1 and cp and not k._core.pending_copies) else ()
                _scatter_state(k, _storage.StateHoles(
                    view, _storage.holes_from_log(holes, cells, k._core.address, k._layers), seq == -1, ran))
        finally:
            self._lock.release()

    @locked
    def state_clear(self, seq_id: int) -> None:
        self.base.state_clear(seq_id)
        self.swa.state_clear(seq_id)


class KVCacheISWAContext(MemoryContext):
    """Two plans over the same micro-batches: ``base`` (full attention) and ``swa``."""

    __slots__ = ("_mem", "base", "swa", "_no_room")

    def __init__(self, mem: KVCacheISWA, base: KVCacheContext, swa: KVCacheContext) -> None:
        # decode_step fills these slots without calling __init__ (register_decode_step.cpp)
        self._mem = mem
        self.base: KVCacheContext = base
        self.swa: KVCacheContext = swa

    @property
    def status(self) -> Status:
        return status_combine(self.base.status, self.swa.status)

    def next(self) -> bool:
        self.swa.next()
        return self.base.next()

    def _is_fresh(self) -> bool:
        return self.base._is_fresh() and self.swa._is_fresh()

    def _check_apply(self) -> None:
        self.base._check_apply()
        self.swa._check_apply()

    def apply(self) -> bool:
        self._mem._lock.acquire()
        try:
            # both plans are checked before either cache changes (either may have been applied
            # on its own through ctx.base / ctx.swa)
            self._check_apply()
            a = self.base.apply()
            b = self.swa.apply()
            return a and b
        finally:
            self._mem._lock.release()

    @property
    def ubatch(self) -> Optional[UBatch]:
        return self.base.ubatch

    def slot_cells(self) -> np.ndarray:
        """Cells of the current micro-batch in the base cache."""
        return self.base.slot_cells()

    def _ctx_of(self, il: int) -> KVCacheContext:
        return self.base if self._mem._cache_of(il) is self._mem.base else self.swa

    def cpy_k(self, il: int, k_cur: "npt.ArrayLike") -> None:
        self._ctx_of(il).cpy_k(il, k_cur)

    def cpy_v(self, il: int, v_cur: "npt.ArrayLike") -> None:
        self._ctx_of(il).cpy_v(il, v_cur)

    def get_k(self, il: int) -> np.ndarray:
        return self._ctx_of(il).get_k(il)

    def get_v(self, il: int) -> np.ndarray:
        return self._ctx_of(il).get_v(il)

    def get_k_float(self, il: int) -> np.ndarray:
        return self._ctx_of(il).get_k_float(il)

    def get_v_float(self, il: int) -> np.ndarray:
        return self._ctx_of(il).get_v_float(il)

    def kq_mask(self, il: int, causal: bool = True, out: Optional[WritableBuffer] = None,
                dtype: npt.DTypeLike = np.float32, pad: int = 1, device: Any = None) -> np.ndarray:
        """The mask for the layer's cache (base: no window; swa: with it); arguments as
        :meth:`KVCacheContext.kq_mask`."""
        return self._ctx_of(il).kq_mask(causal, out=out, dtype=dtype, pad=pad, device=device)

    def kq_cells(self, il: int, causal: bool = True,
                 out: Optional[Sequence[WritableBuffer]] = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-token visible cells of the layer's cache (:meth:`KVCacheContext.kq_cells`)."""
        return self._ctx_of(il).kq_cells(causal, out=out)

    def paged_kv(self, il: int, causal: bool = True, out: Optional[PagedKV] = None,
                 device: Any = None) -> PagedKV:
        """The paged form for the layer's cache: the base table for full-attention layers, the
        window's table for sliding-window layers (:meth:`KVCacheContext.paged_kv`)."""
        return self._ctx_of(il).paged_kv(causal, out=out, device=device)
