"""The memory llama.cpp allocates for a model and a context configuration ("the plan").

:func:`plan_memory` reproduces the decisions ``llama_context`` and ``llama_model::create_memory``
take at start-up: the padded context size, the memory kind (KV cache, iSWA pair, recurrent,
hybrid, hybrid-iSWA), the cells per stream of every component, which layers each component
holds, the element type and byte size of every buffer, and the ``size = ... MiB`` lines llama.cpp
logs. :meth:`MemoryPlan.constructor_kwargs` turns the plan into the keyword arguments of llmem's
memory classes (see :mod:`llmem.factory`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union, cast

import numpy as np

from .compat import Compat, resolve_compat
from .ggml_types import GGML_TYPES, ggml_type
from .hparams import ModelHParams
from .status import SWAType

__all__ = [
    "BufferPlan",
    "KVCachePlan",
    "RecurrentPlan",
    "MemoryPlan",
    "plan_memory",
    "resolve_dtype",
    "MAX_SEQ",
]

# llama.cpp's LLAMA_MAX_SEQ: the largest n_seq_max a context accepts
MAX_SEQ = 256
# llama.cpp pads the context size to a multiple of 256 cells
CTX_PAD = 256
_MIB = 1024 * 1024

DTypeLike = Union[str, int, np.dtype, type]


def resolve_dtype(dtype: DTypeLike, what: str = "dtype") -> str:
    """Normalise a buffer type to a ggml type name of the one table (:data:`llmem.GGML_TYPES`):
    ``"f32"``, ``"f16"``, ``"bf16"`` or a block type llama.cpp offers for its cache (``"q8_0"``,
    ``"q4_0"``, ``"q4_1"``, ``"q5_0"``, ``"q5_1"``, ``"iq4_nl"``).

    Accepts those names (also ``"float32"``, ``"float16"``, ``"bfloat16"``), the ggml type ids,
    and numpy dtypes (``np.float32``, ``np.float16``, an ``ml_dtypes.bfloat16``). Raises
    ``ValueError`` naming ``what`` otherwise.
    """
    try:
        return ggml_type(dtype, what).name
    except TypeError as e:
        raise ValueError(str(e)) from None


def numpy_dtype(name: str) -> Any:
    """The dtype argument of llmem's memories for a ggml type name: numpy's float32/float16,
    bf16 as an ``ml_dtypes.bfloat16`` when installed (else the name), block types by name."""
    if name == "f32":
        return np.dtype(np.float32)
    if name == "f16":
        return np.dtype(np.float16)
    if name != "bf16":
        return name
    try:  # numpy has no bfloat16; ml_dtypes provides one when installed
        import ml_dtypes  # type: ignore[import-not-found, unused-ignore]

        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:
        return "bf16"


def attn_rot_sizes(hp: ModelHParams, layers: List[int], type_k: str, type_v: str) -> Tuple[int, int]:
    """llama.cpp b11549's attention rotation sizes ``(n_rot_k, n_rot_v)`` of a KV cache holding
    ``layers``: a quantized K gets a Hadamard rotation of 64 values, doubled while the (common)
    head size holds twice as many; a quantized V one of 64; 0 when the type is not quantized, the
    head size is not a multiple of 64 or the cache holds no layer. (b11312 applies the same
    rotation but does not record it in the state bytes.)"""
    if not layers:
        return 0, 0
    # set by ModelHParams.__post_init__
    head_k, head_v = cast(int, hp.n_embd_head_k), cast(int, hp.n_embd_head_v)
    n_rot_k = n_rot_v = 0
    if GGML_TYPES[type_k].quantized and head_k > 0 and head_k % 64 == 0:
        n_rot_k = 64
        while head_k % (2 * n_rot_k) == 0:
            n_rot_k *= 2
    if GGML_TYPES[type_v].quantized and head_v > 0 and head_v % 64 == 0:
        n_rot_v = 64
    return n_rot_k, n_rot_v


def _pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


def _mib_f32(nbytes: int) -> float:
    # llama.cpp prints (float) bytes / (1024.0f * 1024.0f): single precision, then %7.2f
    return float(np.float32(nbytes) / np.float32(_MIB))


class LayerSet(List[int]):
    """The model layers a memory component holds, ascending; also callable as the memories'
    ``layer_filter`` (``il -> bool``)."""

    def __call__(self, il: int) -> bool:
        return il in self


@dataclass(frozen=True)
class BufferPlan:
    """One kind of buffer of a component (K, V, R or S), summed over the component's layers."""

    name: str
    dtype: str
    type_id: int
    nbytes: int
    row_elems: Tuple[int, ...]  # elements per cell, one entry per layer of the component

    @property
    def mib(self) -> float:
        """Size in MiB as llama.cpp computes it for its log line."""
        return _mib_f32(self.nbytes)


@dataclass(frozen=True)
class KVCachePlan:
    """One ``llama_kv_cache``: the only cache of a model, or the base/SWA half of an iSWA pair."""

    role: str                 # "kv" (single cache), "base" or "swa"
    kv_size: int              # cells per stream
    n_stream: int
    n_seq_max: int
    unified: bool
    layers: Tuple[int, ...]   # model layer ids held by this cache
    n_swa: int
    swa_type: SWAType
    v_trans: bool
    k: BufferPlan
    v: BufferPlan
    n_rot_k: int = 0          # b11549's attention rotation sizes (state format 4 records them)
    n_rot_v: int = 0
    reuse: Tuple[Tuple[int, int], ...] = ()  # (layer, source layer): layers reading another's K/V

    @property
    def nbytes(self) -> int:
        """K + V bytes."""
        return self.k.nbytes + self.v.nbytes

    @property
    def mib(self) -> float:
        """Total size in MiB as llama.cpp logs it."""
        return _mib_f32(self.nbytes)

    def log_line(self) -> str:
        """The line ``llama_kv_cache`` logs after allocating (``size = ... MiB (...)``)."""
        return ("llama_kv_cache: size = %7.2f MiB (%6u cells, %3d layers, %2u/%u seqs), "
                "K (%s): %7.2f MiB, V (%s): %7.2f MiB"
                % (self.mib, self.kv_size, len(self.layers), self.n_seq_max, self.n_stream,
                   self.k.dtype, self.k.mib, self.v.dtype, self.v.mib))


@dataclass(frozen=True)
class RecurrentPlan:
    """The ``llama_memory_recurrent`` of a recurrent or hybrid model."""

    mem_size: int             # state cells
    n_seq_max: int
    n_rs_seq: int             # rollback snapshots per cell (0: none)
    n_layer: int              # the model's layer count (what llama.cpp logs)
    layers: Tuple[int, ...]   # layers with a state
    r: BufferPlan
    s: BufferPlan
    # the PLE conv history (llama.cpp's p_l), type R; None when no layer has one
    p: Optional[BufferPlan] = None

    @property
    def bufs(self) -> Tuple[BufferPlan, ...]:
        """The buffers: R and S, and P when some layer has one."""
        return (self.r, self.s) if self.p is None else (self.r, self.s, self.p)

    @property
    def nbytes(self) -> int:
        """R + S (+ P) bytes."""
        return sum(b.nbytes for b in self.bufs)

    @property
    def mib(self) -> float:
        """Total size in MiB as llama.cpp logs it."""
        return _mib_f32(self.nbytes)

    def log_line(self) -> str:
        """The line ``llama_memory_recurrent`` logs after allocating.

        The layer count is the model's, not the number of layers with a state (reference
        behaviour); P (the PLE conv history, type R) is printed as 0.00 MiB when no layer has one,
        as llama.cpp does. The total is summed in bytes, then converted.
        """
        p_mib = self.p.mib if self.p is not None else 0.0
        return ("llama_memory_recurrent: size = %7.2f MiB (%6u cells, %3d layers, %2u seqs "
                "%2u rs_seq), R (%s): %7.2f MiB, S (%s): %7.2f MiB, P (%s): %7.2f MiB"
                % (self.mib, self.mem_size, self.n_layer, self.n_seq_max, self.n_rs_seq,
                   self.r.dtype, self.r.mib, self.s.dtype, self.s.mib, self.r.dtype, p_mib))


@dataclass(frozen=True)
class MemoryPlan:
    """Everything llama.cpp decides about a model's memory for one context configuration."""

    hparams: ModelHParams = field(repr=False)
    kind: str                            # kv, iswa, recurrent, hybrid, hybrid_iswa
    n_ctx: int                           # context size after padding (all streams)
    n_ctx_seq: int                       # cells per stream of the (base) KV cache
    n_seq_max: int
    unified: bool
    n_batch: int
    n_ubatch: int
    swa_full: bool
    flash_attn: bool
    kv: Optional[KVCachePlan]            # the single / base KV cache
    kv_swa: Optional[KVCachePlan]        # the SWA half of an iSWA pair
    recurrent: Optional[RecurrentPlan]
    compat: Compat = Compat.B11549       # the llama.cpp build the memories follow

    @property
    def arch(self) -> str:
        """Model architecture name."""
        return self.hparams.arch

    @property
    def v_trans(self) -> bool:
        """Whether V is stored transposed (llama.cpp: ``not flash_attn``)."""
        return not self.flash_attn

    @property
    def can_shift(self) -> bool:
        """llama.cpp's ``memory_can_shift`` for this configuration.

        A recurrent memory always can; an iSWA pair only when both caches have the same size.
        """
        if self.kind == "recurrent":
            return True
        if not self.hparams.can_shift:
            return False
        if self.kv_swa is not None and self.kv is not None:
            return self.kv.kv_size == self.kv_swa.kv_size
        return True

    def components(self) -> List[Tuple[str, Union[KVCachePlan, RecurrentPlan]]]:
        """``(name, plan)`` of every component, in llama.cpp's allocation order."""
        out: List[Tuple[str, Union[KVCachePlan, RecurrentPlan]]] = []
        if self.kv is not None:
            out.append(("kv_base" if self.kv_swa is not None else "kv", self.kv))
        if self.kv_swa is not None:
            out.append(("kv_swa", self.kv_swa))
        if self.recurrent is not None:
            out.append(("recurrent", self.recurrent))
        return out

    def buffers(self) -> Dict[str, int]:
        """Bytes per buffer, keyed ``"<component>.<K|V|R|S|P>"`` (P only where some layer has one)."""
        out: Dict[str, int] = {}
        for name, comp in self.components():
            bufs = (comp.k, comp.v) if isinstance(comp, KVCachePlan) else comp.bufs
            for b in bufs:
                out[f"{name}.{b.name}"] = b.nbytes
        return out

    @property
    def nbytes(self) -> int:
        """Total bytes of all buffers."""
        return sum(self.buffers().values())

    @property
    def mib(self) -> float:
        """Total MiB (double precision; llama.cpp prints no total line)."""
        return self.nbytes / _MIB

    def log_lines(self) -> List[str]:
        """The memory lines llama.cpp logs while creating the context, in order.

        Only the lines whose numbers llmem reproduces: iSWA ``creating ... KV cache`` lines and
        every cache's ``size = ...`` line (not the per-device ``buffer size`` lines, whose values
        include backend alignment).
        """
        lines: List[str] = []
        if self.kv_swa is not None and self.kv is not None:
            lines.append("llama_kv_cache_iswa: creating non-SWA KV cache, size = %u cells"
                         % self.kv.kv_size)
            lines.append(self.kv.log_line())
            lines.append("llama_kv_cache_iswa: creating     SWA KV cache, size = %u cells"
                         % self.kv_swa.kv_size)
            lines.append(self.kv_swa.log_line())
        elif self.kv is not None:
            lines.append(self.kv.log_line())
        if self.recurrent is not None:
            lines.append(self.recurrent.log_line())
        return lines

    # -- constructor arguments of llmem's memory classes ---------------------------------------
    def _kv_kwargs(self, c: KVCachePlan) -> Dict[str, Any]:
        hp = self.hparams
        layers = set(c.layers)
        rope = hp.rope(c.layers[0]) if c.layers else hp.rope()
        return dict(
            n_layer=hp.n_layer,
            # per model layer, 0 where the cache holds no rows; layer_filter says which it holds
            n_embd_k_gqa=[hp.n_embd_k_gqa(il) if il in layers else 0 for il in range(hp.n_layer)],
            n_embd_v_gqa=[hp.n_embd_v_gqa(il) if il in layers else 0 for il in range(hp.n_layer)],
            kv_size=c.kv_size,
            n_seq_max=c.n_seq_max,
            dtype_k=numpy_dtype(c.k.dtype),
            dtype_v=numpy_dtype(c.v.dtype),
            v_trans=c.v_trans,
            unified=c.unified,
            n_pad=1,
            n_swa=c.n_swa,
            swa_type=c.swa_type,
            layer_filter=LayerSet(sorted(c.layers + tuple(il for il, _ in c.reuse))),
            rope=rope,
            compat=self.compat,
            layer_reuse=self._layer_reuse(),
            n_rot_k=c.n_rot_k,
            n_rot_v=c.n_rot_v,
        )

    def _recr_kwargs(self, r: RecurrentPlan) -> Dict[str, Any]:
        hp = self.hparams
        extra: Dict[str, Any] = {}
        if r.p is not None:
            extra["n_embd_p"] = [hp.n_embd_p(il) for il in range(hp.n_layer)]
        return dict(
            n_layer=hp.n_layer,
            n_embd_r=[hp.n_embd_r(il) for il in range(hp.n_layer)],
            n_embd_s=[hp.n_embd_s(il) for il in range(hp.n_layer)],
            mem_size=r.mem_size,
            n_seq_max=r.n_seq_max,
            n_rs_seq=r.n_rs_seq,
            dtype_r=numpy_dtype(r.r.dtype),
            dtype_s=numpy_dtype(r.s.dtype),
            layer_filter=LayerSet(r.layers),
            compat=self.compat,
            **extra,
        )

    def _layer_reuse(self) -> Optional[List[int]]:
        """llama.cpp's layer_reuse_cb as a list (None for models without it)."""
        hp = self.hparams
        reuse = [hp.layer_reuse(il) for il in range(hp.n_layer)]
        return reuse if any(r >= 0 for r in reuse) else None

    def _iswa_kwargs(self) -> Dict[str, Any]:
        hp = self.hparams
        attn = [il for il in range(hp.n_layer) if hp.has_attention(il)]
        assert self.kv is not None  # an iSWA plan has both caches
        base = self._kv_kwargs(self.kv)
        attn_set = set(attn)
        base.update(
            n_embd_k_gqa=[hp.n_embd_k_gqa(il) if il in attn_set else 0 for il in range(hp.n_layer)],
            n_embd_v_gqa=[hp.n_embd_v_gqa(il) if il in attn_set else 0 for il in range(hp.n_layer)],
            kv_size=self.kv.kv_size,   # the base size; the SWA size follows from the rule below
            n_swa=hp.n_swa,
            swa_type=hp.swa_type,
            swa_full=self.swa_full,
            n_ubatch=self.n_ubatch,
            is_swa_layer=[hp.is_swa_layer(il) for il in range(hp.n_layer)],
            layer_filter=LayerSet(attn),
            # the rope of the full-attention layers; SWA layers of some models (gemma3) rotate
            # with their own base, given by hparams.rope(il)
            rope=hp.rope(self.kv.layers[0]) if self.kv.layers else hp.rope(),
        )
        return base

    def constructor_kwargs(self) -> Dict[str, Dict[str, Any]]:
        """Keyword arguments of the llmem constructors that build this memory, per component.

        Keys: ``"kv"`` (``KVCache``), ``"iswa"`` (``KVCacheISWA``; its ``kv_size`` is the base
        size, ``n_ubatch``/``swa_full`` give the SWA size), ``"recurrent"``
        (``RecurrentMemory``), and for hybrids ``"hybrid"`` with ``is_recurrent_layer`` (the
        attention/recurrent sub-memories are built from ``"kv"``/``"iswa"`` and
        ``"recurrent"``). Per-layer widths cover every model layer (0 where a component holds
        no rows); ``layer_filter`` lists the model layers the component holds. ``kv_size`` is
        exactly what llama.cpp allocates (already padded); the iSWA SWA cache size follows from
        ``kv_size``, ``n_swa``, ``n_seq_max``, ``unified``, ``n_ubatch`` and ``swa_full``
        (``plan.kv_swa.kv_size`` holds the result).
        """
        out: Dict[str, Dict[str, Any]] = {}
        if self.kind in ("kv", "hybrid") and self.kv is not None:
            out["kv"] = self._kv_kwargs(self.kv)
        if self.kind in ("iswa", "hybrid_iswa"):
            out["iswa"] = self._iswa_kwargs()
        if self.recurrent is not None:
            out["recurrent"] = self._recr_kwargs(self.recurrent)
        if self.kind in ("hybrid", "hybrid_iswa"):
            hp = self.hparams
            out["hybrid"] = dict(
                is_recurrent_layer=[hp.is_recurrent(il) for il in range(hp.n_layer)])
        return out

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready summary (what ``llmem plan --json`` prints)."""
        comps = []
        for name, c in self.components():
            d: Dict[str, Any] = {"name": name, "layers": list(c.layers),
                                 "n_layers": len(c.layers), "bytes": c.nbytes,
                                 "mib": round(c.mib, 2), "log": c.log_line()}
            if isinstance(c, KVCachePlan):
                d.update(cells=c.kv_size, n_stream=c.n_stream, n_swa=c.n_swa,
                         swa_type=SWAType(c.swa_type).name, v_trans=c.v_trans)
                bufs: Tuple[BufferPlan, ...] = (c.k, c.v)
            else:
                d.update(cells=c.mem_size, n_rs_seq=c.n_rs_seq)
                bufs = c.bufs
            d["buffers"] = [{"name": b.name, "dtype": b.dtype, "type_id": b.type_id,
                             "bytes": b.nbytes, "mib": round(b.mib, 2)} for b in bufs]
            comps.append(d)
        return {
            "arch": self.arch, "kind": self.kind, "n_layer": self.hparams.n_layer,
            "n_ctx": self.n_ctx, "n_ctx_seq": self.n_ctx_seq, "n_seq_max": self.n_seq_max,
            "unified": self.unified, "n_batch": self.n_batch, "n_ubatch": self.n_ubatch,
            "swa_full": self.swa_full, "flash_attn": self.flash_attn, "v_trans": self.v_trans,
            "can_shift": self.can_shift, "components": comps, "total_bytes": self.nbytes,
            "total_mib": round(self.mib, 2), "log": self.log_lines(),
        }


def _check_int(value: Any, name: str, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    number = int(value)
    if number < lo or (hi is not None and number > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {number}")
    return number


def _kv_plan(hp: ModelHParams, role: str, layers: List[int], kv_size: int, n_seq_max: int,
             unified: bool, n_swa: int, swa_type: SWAType, v_trans: bool, type_k: str,
             type_v: str) -> KVCachePlan:
    n_stream = 1 if unified else n_seq_max
    # layers without K/V of their own read another layer's (layer_reuse) and allocate nothing
    reuse = tuple((il, hp.layer_reuse(il)) for il in layers if hp.layer_reuse(il) >= 0)
    layers = [il for il in layers if hp.has_kv(il)]
    k_rows = tuple(hp.n_embd_k_gqa(il) for il in layers)
    # transposed V is padded to the widest V row of the whole model (llama.cpp's
    # TAG_V_CACHE_VARIABLE); without transposition each layer keeps its own width
    v_max = hp.n_embd_v_gqa_max()
    v_rows = tuple(v_max if v_trans else hp.n_embd_v_gqa(il) for il in layers)
    tk, tv = GGML_TYPES[type_k], GGML_TYPES[type_v]
    # ggml_row_size per layer: a block type stores whole blocks of each row
    k = BufferPlan("K", type_k, tk.id, sum(tk.row_size(e) for e in k_rows) * kv_size * n_stream, k_rows)
    v = BufferPlan("V", type_v, tv.id, sum(tv.row_size(e) for e in v_rows) * kv_size * n_stream, v_rows)
    n_rot_k, n_rot_v = attn_rot_sizes(hp, layers, type_k, type_v)
    return KVCachePlan(role=role, kv_size=kv_size, n_stream=n_stream, n_seq_max=n_seq_max,
                       unified=unified, layers=tuple(layers), n_swa=n_swa, swa_type=swa_type,
                       v_trans=v_trans, k=k, v=v, n_rot_k=n_rot_k, n_rot_v=n_rot_v, reuse=reuse)


def _check_cache_types(hp: ModelHParams, type_k: str, type_v: str, flash_attn: bool) -> None:
    """llama.cpp's context checks of the cache types (llama_init_from_model)."""
    tk, tv = GGML_TYPES[type_k], GGML_TYPES[type_v]
    if tv.quantized and not flash_attn:
        raise ValueError(f"type_v {type_v}: a quantized V cache requires flash_attn (llama.cpp: "
                         "'quantized V cache requires flash_attn to be enabled')")
    if tk.quantized and cast(int, hp.n_embd_head_k) % tk.block_size:
        raise ValueError(f"type_k {type_k} with block size {tk.block_size} does not divide "
                         f"n_embd_head_k={hp.n_embd_head_k}")
    if tv.quantized and cast(int, hp.n_embd_head_v) % tv.block_size:
        raise ValueError(f"type_v {type_v} with block size {tv.block_size} does not divide "
                         f"n_embd_head_v={hp.n_embd_head_v}")


def plan_memory(hparams: ModelHParams, n_ctx: int, n_seq_max: int = 1, unified: bool = True,
                type_k: DTypeLike = "f16", type_v: DTypeLike = "f16", type_r: DTypeLike = "f32",
                type_s: DTypeLike = "f32", swa_full: bool = False, n_ubatch: int = 512,
                flash_attn: bool = False, n_batch: int = 2048, n_rs_seq: int = 0,
                compat: Union[str, Compat, None] = None) -> MemoryPlan:
    """Compute the memory llama.cpp allocates for ``hparams`` with these context settings.

    Reproduces ``llama_context``'s sizes and ``llama_model::create_memory``'s choices:

    * ``n_ctx`` (0 = the model's training context) is padded up to a multiple of 256; without
      ``unified`` each sequence gets its own stream of ``n_ctx_seq = pad256(n_ctx / n_seq_max)``
      cells (integer division of the padded size), else one stream of ``n_ctx`` cells.
    * ``n_batch = min(n_ctx as requested, n_batch)``, ``n_ubatch = min(n_batch, n_ubatch)``.
    * the memory kind follows :attr:`ModelHParams.memory_kind`; an iSWA SWA cache has
      ``pad256(min(n_ctx_seq, n_swa * (n_seq_max if unified else 1) + n_ubatch))`` cells, or
      ``n_ctx_seq`` with ``swa_full``; a recurrent memory has ``max(1, n_seq_max)`` cells.
    * V is transposed unless ``flash_attn``; K/V use ``type_k``/``type_v``, R/S ``type_r``/
      ``type_s`` (llama.cpp always uses f32 for R and S; other types are for experiments).

    ``n_rs_seq`` is llama.cpp's rollback snapshot count (R/S rows are multiplied by
    ``1 + n_rs_seq``); llama.cpp forces it to 0 for architectures without rollback support.

    ``type_k``/``type_v`` take ggml's names, block types included (``"q8_0"``...: sizes are
    ggml's row sizes); a quantized V needs ``flash_attn`` and a block size that divides the head
    size, as llama.cpp checks. ``compat`` (``"b11549"`` default, or ``"b11312"``) is the llama.cpp
    build the memories follow (state bytes, recurrent rules; :mod:`llmem.compat`).
    """
    if not isinstance(hparams, ModelHParams):
        raise TypeError(f"hparams must be a ModelHParams, got {type(hparams).__name__}")
    n_ctx_req = _check_int(n_ctx, "n_ctx", 0)
    n_seq_max = _check_int(n_seq_max, "n_seq_max", 1, MAX_SEQ)
    n_ubatch = _check_int(n_ubatch, "n_ubatch", 1)
    n_batch = _check_int(n_batch, "n_batch", 1)
    n_rs_seq = _check_int(n_rs_seq, "n_rs_seq", 0)
    unified = bool(unified)
    swa_full = bool(swa_full)
    flash_attn = bool(flash_attn)
    tk = resolve_dtype(type_k, "type_k")
    tv = resolve_dtype(type_v, "type_v")
    tr = resolve_dtype(type_r, "type_r")
    ts = resolve_dtype(type_s, "type_s")
    for what, name in (("type_r", tr), ("type_s", ts)):
        if GGML_TYPES[name].quantized:
            raise ValueError(f"{what}: the recurrent state is stored element-wise (f32, f16, bf16), got {name}")
    compat = resolve_compat(compat)

    if n_ctx_req == 0:
        n_ctx_req = hparams.n_ctx_train
        if n_ctx_req <= 0:
            raise ValueError("n_ctx is 0 and the model has no training context length")
    # llama_context: batch sizes follow the requested (unpadded) context of a causal model
    n_batch = min(n_ctx_req, n_batch)
    n_ubatch = min(n_batch, n_ubatch)
    n_ctx_pad = _pad(n_ctx_req, CTX_PAD)
    if unified:
        n_ctx_seq = n_ctx_pad
        n_ctx_total = n_ctx_pad
    else:
        n_ctx_seq = _pad(n_ctx_pad // n_seq_max, CTX_PAD)
        n_ctx_total = n_ctx_seq * n_seq_max

    hp = hparams
    kind = hp.memory_kind
    v_trans = not flash_attn
    kv = kv_swa = recr = None
    attn_layers = list(hp.attention_layer_ids())
    if kind != "recurrent":
        _check_cache_types(hp, tk, tv, flash_attn)

    if kind in ("kv", "hybrid"):
        kv = _kv_plan(hp, "kv", attn_layers, n_ctx_seq, n_seq_max, unified, hp.n_swa,
                      hp.swa_type, v_trans, tk, tv)
    elif kind in ("iswa", "hybrid_iswa"):
        size_swa = n_ctx_seq
        if not swa_full:
            window = hp.n_swa * (n_seq_max if unified else 1) + n_ubatch
            size_swa = _pad(min(n_ctx_seq, window), CTX_PAD)
        base_layers = [il for il in attn_layers if not hp.is_swa_layer(il)]
        swa_layers = [il for il in attn_layers if hp.is_swa_layer(il)]
        kv = _kv_plan(hp, "base", base_layers, n_ctx_seq, n_seq_max, unified, 0,
                      SWAType.NONE, v_trans, tk, tv)
        kv_swa = _kv_plan(hp, "swa", swa_layers, size_swa, n_seq_max, unified, hp.n_swa,
                          hp.swa_type, v_trans, tk, tv)

    if kind in ("recurrent", "hybrid", "hybrid_iswa"):
        mem_size = max(1, n_seq_max)
        layers = list(hp.recurrent_layer_ids())
        rows = mem_size * (1 + n_rs_seq)
        r_rows = tuple(hp.n_embd_r(il) for il in layers)
        s_rows = tuple(hp.n_embd_s(il) for il in layers)
        p_rows = tuple(hp.n_embd_p(il) for il in layers)
        tr_id, tr_size = GGML_TYPES[tr].id, GGML_TYPES[tr].type_size
        ts_id, ts_size = GGML_TYPES[ts].id, GGML_TYPES[ts].type_size
        # the PLE conv history rows, type R, where a held layer has one (llama.cpp's p_l)
        p_plan = (BufferPlan("P", tr, tr_id, sum(p_rows) * rows * tr_size, p_rows)
                  if any(p_rows) else None)
        recr = RecurrentPlan(
            mem_size=mem_size, n_seq_max=n_seq_max, n_rs_seq=n_rs_seq, n_layer=hp.n_layer,
            layers=tuple(layers),
            r=BufferPlan("R", tr, tr_id, sum(r_rows) * rows * tr_size, r_rows),
            s=BufferPlan("S", ts, ts_id, sum(s_rows) * rows * ts_size, s_rows),
            p=p_plan)

    return MemoryPlan(hparams=hp, kind=kind, n_ctx=n_ctx_total, n_ctx_seq=n_ctx_seq,
                      n_seq_max=n_seq_max, unified=unified, n_batch=n_batch, n_ubatch=n_ubatch,
                      swa_full=swa_full, flash_attn=flash_attn, kv=kv, kv_swa=kv_swa,
                      recurrent=recr, compat=compat)
