"""Replay the llama.cpp oracle recordings (``tests/data/oracle/``) through llmem.

``oracle_replay`` loads what llama.cpp answered; this module builds the llmem memory llama.cpp built
for the same model and context, executes every scenario step the way llama.cpp's ``llama_decode`` /
``llama_memory_*`` / ``llama_state_*`` functions drive the memory, and returns observations in the
recorded format, so that ``test_oracle_replay.py`` can compare them field by field.

How a recorded context becomes an llmem memory (model shapes from
``/work/shared/oracle/make_models.py``, context rules from the oracle README and ``kv_cache.md`` §3):

* sizes (:func:`context_sizes`) derived from the scenario's context as llama.cpp derives them and
  checked against the recorded ``info``: KV size per stream = ``n_ctx_seq``; ``n_batch``, ``n_ubatch``.
* ``unified`` = ``kv_unified``; ``v_trans`` = not flash attention; K/V dtypes = ``type_k``/``type_v``
  (f16 by default); ``n_pad`` 1.
* iSWA (gemma2): the SWA layers are those of the model (gemma2 layer 0), window 16 (the model's),
  ``swa_full`` and ``n_ubatch`` from the context (they size the SWA cache).
* recurrent: ``mem_size = max(1, n_seq_max)``, f32 r/s states, rows as in the oracle README
  (mamba r = (d_conv-1) d_inner, s = d_state d_inner; mamba2 r = (d_conv-1)(d_inner + 2 n_group
  d_state); lfm2 r = (l_cache-1) n_embd, s = 0), ``n_layer`` = the model's total layer count,
  ``n_rs_seq`` from the context for archs with rollback support (lfm2), clamped to 0 otherwise
  (``rec_mamba_rs_seq_ignored``).
* hybrid / hybrid-iSWA (jamba, lfm2, lfm2_swa): ``HybridMemory(attn=KVCache(...), recr=...)`` /
  ``HybridISWAMemory(attn=KVCacheISWA(...), recr=...)`` with the attention layers filtered in the KV
  part and the recurrent layers in the recurrent part (API.md).

How a step is executed (``batch_recurrent_hybrid.md`` §8, ``kv_cache.md`` §10):

* ``decode``: a batch larger than ``n_batch`` is refused (llama.cpp aborts there; llmem has no
  ``n_batch``, so the driver raises :class:`DecodeRefused` and the memory is untouched); build an
  ``llmem.Batch`` from the step (omitted ``pos``/``seq_ids``/``logits`` stay omitted: llmem fills
  them as llama.cpp does); ``BatchAllocator(n_seq_max, n_vocab=64).init(batch, memory)`` (-1 on
  ``BatchError``); ``init_update()`` applied when SUCCESS; ``init_batch(balloc, n_ubatch)``; on
  FAILED_PREPARE one ``init_update(optimize=True)`` and a retry if it had work, else ret 1; then
  apply every ubatch, read the recurrent inputs as the model graph does (``s_copy_all``, which
  consumes pending rollbacks, then ``get_r``/``get_s``), and record the ubatch in the oracle's trace
  format when the scenario is traced.
* seq ops, ``pos``, ``can_shift``: the memory's methods.
* state: sequence blobs are framed as ``llama_state_seq_get_data`` frames them (u32 magic
  0xaf143cd8, i32 seq id, then ``state_write(seq, flags)``), full states as ``llama_state_get_data``
  (u32 length + arch name, then ``state_write(-1)``). Reading checks the same framing (failure
  there: ret 0, memory untouched), then ``state_read`` of the remainder: ret = blob length on
  success, 0 when llmem raises ``StateError``. ``meta`` is produced by :func:`parse_seq_state` /
  :func:`parse_full_state`, a parser written from the layout in the oracle README.
* ``logits``: llmem runs no model; the step is recorded as ``{}``.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import llmem
from llmem import Batch, BatchAllocator, BatchError, LlmemError, StateError, Status, SWAType

from oracle_replay import N_VOCAB, Case, Step, expand_decode

STATE_SEQ_MAGIC = 0xAF143CD8
PARTIAL_ONLY = 1

_DTYPES = {"f16": np.float16, "f32": np.float32, "bf16": "bf16", **{q: q for q in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")}}


# ----------------------------------------------------------------------------------------------
# model shapes (make_models.py)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What llama.cpp's memory needs to know about one oracle model."""

    arch: str
    kind: str                                  # kv, iswa, recurrent, hybrid or hybrid_iswa
    n_layer: int
    attn_layers: Tuple[int, ...] = ()          # layers with a KV cache
    recurrent_layers: Tuple[int, ...] = ()     # layers with a recurrent state
    swa_layers: Tuple[int, ...] = ()           # attention layers with a sliding window
    n_embd_k_gqa: int = 0                      # n_head_kv * head_dim
    n_embd_v_gqa: int = 0
    head_dim: int = 0
    rope_mode: str = "normal"
    n_embd_r: int = 0                          # elements per recurrent r row
    n_embd_s: int = 0                          # elements per recurrent s row
    rollback: bool = False                     # llama.cpp keeps n_rs_seq for this arch (else 0)
    n_swa: int = 0                             # sliding window of the SWA layers

    @property
    def n_layer_recurrent(self) -> int:
        return len(self.recurrent_layers)


def _mamba_rows(n_embd: int, d_conv: int, d_state: int, n_group: int = 0) -> Tuple[int, int]:
    d_inner = 2 * n_embd
    r = (d_conv - 1) * (d_inner + 2 * n_group * d_state)
    s = d_state * d_inner
    return r, s


_MAMBA_R, _MAMBA_S = _mamba_rows(32, 4, 16)              # 192, 1024 floats (768 / 4096 bytes)
_MAMBA2_R, _MAMBA2_S = _mamba_rows(32, 4, 16, n_group=2)  # 384, 1024 floats (1536 / 4096 bytes)
_LFM2_R = (3 - 1) * 32                                    # (l_cache - 1) * n_embd = 64 floats

MODELS: Dict[str, ModelShape] = {
    # 2 layers, n_embd 64, 4 heads, 2 KV heads of 16: n_embd_k_gqa 32 (K row 64 bytes in f16)
    "llama": ModelShape("llama", "kv", 2, attn_layers=(0, 1), n_embd_k_gqa=32, n_embd_v_gqa=32, head_dim=16),
    # llmem's extra model for quantized caches (scripts/oracle/make_models.py): n_embd 128, 4 heads,
    # 2 KV heads of 32, so a block of 32 values is one head: n_embd_k_gqa 64
    "llama_hd32": ModelShape("llama", "kv", 2, attn_layers=(0, 1), n_embd_k_gqa=64, n_embd_v_gqa=64, head_dim=32),
    # as llama; layer 0 SWA (window 16), layer 1 full; gemma2 ropes in neox mode
    "gemma2": ModelShape("gemma2", "iswa", 2, attn_layers=(0, 1), swa_layers=(0,), n_embd_k_gqa=32,
                         n_embd_v_gqa=32, head_dim=16, rope_mode="neox", n_swa=16),
    "mamba": ModelShape("mamba", "recurrent", 2, recurrent_layers=(0, 1), n_embd_r=_MAMBA_R, n_embd_s=_MAMBA_S),
    "mamba2": ModelShape("mamba2", "recurrent", 2, recurrent_layers=(0, 1), n_embd_r=_MAMBA2_R, n_embd_s=_MAMBA2_S),
    # attn, mamba, attn, mamba; n_embd 32, 4 heads, 2 KV heads of 8
    "jamba": ModelShape("jamba", "hybrid", 4, attn_layers=(0, 2), recurrent_layers=(1, 3), n_embd_k_gqa=16,
                        n_embd_v_gqa=16, head_dim=8, n_embd_r=_MAMBA_R, n_embd_s=_MAMBA_S),
    # attn, conv, attn, conv; short conv l_cache 3, empty s state
    "lfm2": ModelShape("lfm2", "hybrid", 4, attn_layers=(0, 2), recurrent_layers=(1, 3), n_embd_k_gqa=16,
                       n_embd_v_gqa=16, head_dim=8, rope_mode="neox", n_embd_r=_LFM2_R, n_embd_s=0,
                       rollback=True),
    # lfm2 with sliding_window 16: every attention layer is SWA (the base cache has no layer)
    "lfm2_swa": ModelShape("lfm2", "hybrid_iswa", 4, attn_layers=(0, 2), recurrent_layers=(1, 3),
                           swa_layers=(0, 2),
                           n_embd_k_gqa=16, n_embd_v_gqa=16, head_dim=8, rope_mode="neox",
                           n_embd_r=_LFM2_R, n_embd_s=0, rollback=True, n_swa=16),
}


def _pad256(n: int) -> int:
    return (n + 255) // 256 * 256


def context_sizes(case: Case) -> Dict[str, int]:
    """The sizes llama.cpp derives from the context parameters (oracle README, kv_cache.md §3):
    n_ctx padded to 256; without kv_unified n_ctx_seq = pad256(n_ctx / n_seq_max) and
    n_ctx = n_ctx_seq * n_seq_max; n_batch = min(requested n_ctx, n_batch); n_ubatch <= n_batch."""
    c = case.context
    n_seq_max = int(c["n_seq_max"])
    n_ctx = _pad256(int(c["n_ctx"]))
    if c["kv_unified"]:
        n_ctx_seq = n_ctx
    else:
        n_ctx_seq = _pad256(n_ctx // n_seq_max)
        n_ctx = n_ctx_seq * n_seq_max
    n_batch = min(int(c["n_ctx"]), int(c["n_batch"]))
    return {"n_ctx": n_ctx, "n_ctx_seq": n_ctx_seq, "n_batch": n_batch,
            "n_ubatch": min(n_batch, int(c["n_ubatch"])), "n_seq_max": n_seq_max,
            "n_swa": MODELS[case.model].n_swa}


# ----------------------------------------------------------------------------------------------
# building the memory llama.cpp built
# ----------------------------------------------------------------------------------------------

#: The llama.cpp build the recordings were made with (llama-cpp-python 0.3.36): the memories of
#: the replay follow it where builds differ (state format 3, recurrent seq_rm rules).
ORACLE_COMPAT = "b11312"


class HybridUnavailable(AssertionError):
    """The hybrid memory classes are not in this llmem build yet."""


def _kv_kwargs(case: Case, shape: ModelShape) -> Dict[str, Any]:
    c = case.context
    if c["flash_attn"] not in ("on", "off"):
        raise ValueError(f"{case.name}: flash_attn {c['flash_attn']!r} is not reproducible on the llmem side")
    return dict(
        n_layer=shape.n_layer, n_embd_k_gqa=shape.n_embd_k_gqa, n_embd_v_gqa=shape.n_embd_v_gqa,
        kv_size=context_sizes(case)["n_ctx_seq"], n_seq_max=int(c["n_seq_max"]),
        dtype_k=_DTYPES[c["type_k"]], dtype_v=_DTYPES[c["type_v"]],
        v_trans=c["flash_attn"] == "off", unified=bool(c["kv_unified"]), n_pad=1,
        rope=llmem.Rope(n_rot=shape.head_dim, freq_base=10000.0, mode=shape.rope_mode),
        # the recordings come from llama.cpp b11312 (llama-cpp-python 0.3.36): its state bytes
        compat=ORACLE_COMPAT,
    )


def _iswa(case: Case, shape: ModelShape, layer_filter: Optional[Callable[[int], bool]]) -> "llmem.KVCacheISWA":
    swa = set(shape.swa_layers)
    return llmem.KVCacheISWA(
        **_kv_kwargs(case, shape), n_swa=shape.n_swa, swa_type=SWAType.STANDARD,
        swa_full=bool(case.context["swa_full"]), is_swa_layer=[il in swa for il in range(shape.n_layer)],
        n_ubatch=context_sizes(case)["n_ubatch"], layer_filter=layer_filter)


def _recurrent(case: Case, shape: ModelShape) -> "llmem.RecurrentMemory":
    n_seq_max = int(case.context["n_seq_max"])
    rec = set(shape.recurrent_layers)
    return llmem.RecurrentMemory(
        n_layer=shape.n_layer, n_embd_r=shape.n_embd_r, n_embd_s=shape.n_embd_s,
        mem_size=max(1, n_seq_max), n_seq_max=n_seq_max,
        n_rs_seq=int(case.context["n_rs_seq"]) if shape.rollback else 0,
        dtype_r=np.float32, dtype_s=np.float32,
        layer_filter=None if len(rec) == shape.n_layer else [il in rec for il in range(shape.n_layer)],
        compat=ORACLE_COMPAT)


def build_memory(case: Case):
    """The llmem memory llama.cpp built for ``case`` (raises HybridUnavailable for hybrids
    while ``llmem.HybridMemory`` / ``llmem.HybridISWAMemory`` do not exist)."""
    shape = MODELS[case.model]
    kind = shape.kind
    if kind == "kv":
        return llmem.KVCache(**_kv_kwargs(case, shape))
    if kind == "iswa":
        return _iswa(case, shape, None)
    if kind == "recurrent":
        return _recurrent(case, shape)
    attn_set = set(shape.attn_layers)
    is_attn = [il in attn_set for il in range(shape.n_layer)]
    is_rec = [il in set(shape.recurrent_layers) for il in range(shape.n_layer)]
    if kind == "hybrid":
        cls = getattr(llmem, "HybridMemory", None)
        if cls is None:
            raise HybridUnavailable(f"{case.name}: HybridMemory not available in this llmem build "
                                    "(lead's branch 'hybrid' not merged yet)")
        attn = llmem.KVCache(**_kv_kwargs(case, shape), layer_filter=lambda il: is_attn[il])
        return cls(attn=attn, recr=_recurrent(case, shape), is_recurrent_layer=is_rec)
    if kind == "hybrid_iswa":
        cls = getattr(llmem, "HybridISWAMemory", None)
        if cls is None:
            raise HybridUnavailable(f"{case.name}: HybridISWAMemory not available in this llmem build "
                                    "(lead's branch 'hybrid' not merged yet)")
        attn = _iswa(case, shape, lambda il: is_attn[il])
        return cls(attn=attn, recr=_recurrent(case, shape), is_recurrent_layer=is_rec)
    raise ValueError(f"{case.name}: unknown memory kind {kind!r}")


# ----------------------------------------------------------------------------------------------
# state blob parsing (from the layout in /work/shared/oracle/README.md; payloads hashed)
# ----------------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.off = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.off + n > len(self.data):
            raise ValueError(f"state blob too short: need {n} bytes at offset {self.off}, have {len(self.data)}")
        b = self.data[self.off:self.off + n]
        self.off += n
        return b

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def i32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def payload(self, n: int) -> str:
        return hashlib.sha256(self.take(n)).hexdigest()[:16]


def _cells(r: _Reader, count: int) -> List[list]:
    out = []
    for _ in range(count):
        pos = r.i32()
        n_seq = r.u32()
        out.append([pos, [r.i32() for _ in range(n_seq)]])
    return out


def _kv_part(r: _Reader, name: str) -> Dict[str, Any]:
    """One KV cache section: n_stream; per stream cell_count, cells, v_trans, n_layer, K, V."""
    out: Dict[str, Any] = {"part": name, "offset": r.off, "n_stream": r.u32(), "streams": []}
    for s in range(out["n_stream"]):
        count = r.u32()
        st: Dict[str, Any] = {"stream": s, "cell_count": count}
        out["streams"].append(st)
        if count == 0:
            continue
        st["cells"] = _cells(r, count)
        st["v_trans"] = r.u32()
        n_layer = r.u32()
        st["n_layer"] = n_layer
        st["k"] = []
        for _ in range(n_layer):
            t, row = r.i32(), r.u64()
            st["k"].append({"type": t, "row_size": row, "sha": r.payload(row * count)})
        st["v"] = []
        for _ in range(n_layer):
            t = r.i32()
            if st["v_trans"]:
                el, n_embd = r.u32(), r.u32()
                st["v"].append({"type": t, "el_size": el, "n_embd_v_gqa": n_embd,
                                "sha": r.payload(el * n_embd * count)})
            else:
                row = r.u64()
                st["v"].append({"type": t, "row_size": row, "sha": r.payload(row * count)})
    return out


def _recurrent_part(r: _Reader, n_layer_recurrent: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {"part": "recurrent", "offset": r.off}
    count = r.u32()
    out["cell_count"] = count
    out["cells"] = _cells(r, count)
    out["s_trans"] = r.u32()
    out["n_layer"] = r.u32()
    for key in ("r", "s"):
        out[key] = []
        for _ in range(n_layer_recurrent):
            t, row = r.i32(), r.u64()
            out[key].append({"type": t, "row_size": row, "sha": r.payload(row * count)})
    return out


def _memory_parts(r: _Reader, kind: str, shape: ModelShape, partial_only: bool) -> List[Dict[str, Any]]:
    if kind == "kv":
        return [_kv_part(r, "kv")]
    if kind == "iswa":
        return ([] if partial_only else [_kv_part(r, "kv_base")]) + [_kv_part(r, "kv_swa")]
    if kind == "recurrent":
        return [_recurrent_part(r, shape.n_layer_recurrent)]
    if kind == "hybrid":
        return ([] if partial_only else [_kv_part(r, "kv_attn")]) + [_recurrent_part(r, shape.n_layer_recurrent)]
    if kind == "hybrid_iswa":
        # batch_recurrent_hybrid.md §7 and oracle README C2: PARTIAL_ONLY skips the base part only
        parts = [] if partial_only else [_kv_part(r, "kv_base")]
        return parts + [_kv_part(r, "kv_swa"), _recurrent_part(r, shape.n_layer_recurrent)]
    raise ValueError(f"unknown memory kind {kind!r}")


def parse_seq_state(data: bytes, kind: str, shape: ModelShape, flags: int = 0) -> Dict[str, Any]:
    r = _Reader(data)
    magic = r.u32()
    if magic != STATE_SEQ_MAGIC:
        raise ValueError(f"bad sequence-state magic {magic:#x}")
    out = {"magic": f"{magic:#x}", "seq_id": r.i32(),
           "parts": _memory_parts(r, kind, shape, bool(flags & PARTIAL_ONLY))}
    out["trailing_bytes"] = len(data) - r.off
    return out


def parse_full_state(data: bytes, kind: str, shape: ModelShape) -> Dict[str, Any]:
    r = _Reader(data)
    n = r.u32()
    out = {"arch": r.take(n).decode(), "parts": _memory_parts(r, kind, shape, False)}
    out["trailing_bytes"] = len(data) - r.off
    return out


# ----------------------------------------------------------------------------------------------
# the runner
# ----------------------------------------------------------------------------------------------

class DecodeRefused(ValueError):
    """The driver refused a decode step that makes llama.cpp abort (n_tokens > n_batch)."""


def ubatch_record(ub) -> Dict[str, Any]:
    """A micro-batch in the oracle's trace format (``LLAMA_BATCH_DEBUG`` as parsed by oracle.py):
    seq ids of a token are listed as the set bits of llama.cpp's mask, i.e. ascending."""
    tokens = ub.token.tolist()
    pos = ub.pos.tolist()
    out = ub.output.tolist()
    seqs = ub.seq_id_list
    return {
        "n_seq_tokens": int(ub.n_seq_tokens), "n_seqs": int(ub.n_seqs), "equal_seqs": int(bool(ub.equal_seqs)),
        "seq_id_unq": [int(s) for s in ub.seq_id_unq.tolist()],
        "tokens": [[int(tokens[i]), int(pos[i]), sorted(int(s) for s in seqs[i]), int(bool(out[i]))]
                   for i in range(int(ub.n_tokens))],
    }


@dataclass
class LlmemRunner:
    """Executes the steps of one recorded case on a fresh llmem memory."""

    case: Case
    mem: Any = None
    blobs: Dict[int, bytes] = field(default_factory=dict)
    #: write deterministic stand-in K/V rows and recurrent states for every ubatch (see ``_compute``)
    fake_data: bool = False

    def __post_init__(self) -> None:
        self.shape = MODELS[self.case.model]
        self.kind = self.shape.kind
        self.sizes = context_sizes(self.case)
        self.n_seq_max = self.sizes["n_seq_max"]
        self.n_batch = self.sizes["n_batch"]
        self.n_ubatch = self.sizes["n_ubatch"]
        self.traced = self.case.traced
        if self.mem is None:
            self.mem = build_memory(self.case)

    def info(self) -> Dict[str, Any]:
        """The recorded ``info`` fields as this runner derived them (sizes, window) and as llmem
        answers them (``can_shift`` of the fresh memory)."""
        return dict(self.sizes, arch=self.shape.arch, memory=self.kind,
                    can_shift=bool(self.mem.get_can_shift()))

    # -- driving -------------------------------------------------------------------------------
    def run_step(self, step: Step) -> Dict[str, Any]:
        handler = getattr(self, f"_op_{step.op}", None)
        if handler is None:
            raise ValueError(f"{step.where()}: unknown op {step.op!r}")
        return handler(step.index, step.args)

    def run(self) -> List[Dict[str, Any]]:
        return [dict(step=s.index, op=s.op, **self.run_step(s)) for s in self.case.steps()]

    # -- decode --------------------------------------------------------------------------------
    def _op_decode(self, i: int, args: Dict[str, Any]) -> Dict[str, Any]:
        b = expand_decode(args, N_VOCAB)
        n = len(b["tokens"])
        if n > self.n_batch:
            # llama.cpp: GGML_ASSERT(n_tokens <= n_batch) aborts; the driver refuses before touching
            # the memory (llmem itself has no n_batch).
            raise DecodeRefused(f"n_tokens {n} > n_batch {self.n_batch}")
        try:
            batch = Batch(token=np.asarray(b["tokens"], dtype=np.int32) if n else None,
                          pos=b["pos"], seq_id=b["seq_ids"],
                          output=None if b["logits"] is None else [bool(x) for x in b["logits"]])
        except BatchError as e:
            return self._decode_result(-1, f"Batch: {e.reason}: {e}")
        balloc = BatchAllocator(self.n_seq_max, n_vocab=N_VOCAB)
        try:
            balloc.init(batch, memory=self.mem)
        except BatchError as e:
            return self._decode_result(-1, f"BatchAllocator.init: {e.reason}: {e}")
        # pending work (stream copies, K-shift) is applied before the batch is placed
        upd = self.mem.init_update(False)
        if upd.status == Status.SUCCESS:
            upd.apply()
        ctx = self.mem.init_batch(balloc, self.n_ubatch)
        if ctx.status == Status.FAILED_PREPARE:
            upd = self.mem.init_update(True)
            if upd.status == Status.SUCCESS:
                upd.apply()
                ctx = self.mem.init_batch(balloc, self.n_ubatch)
        if ctx.status == Status.FAILED_PREPARE:
            return self._decode_result(1, "init_batch: FAILED_PREPARE")
        if ctx.status != Status.SUCCESS:
            return self._decode_result(-2, f"init_batch: {Status(ctx.status).name}")
        ubatches = []
        while True:
            if not ctx.apply():
                raise LlmemError(f"apply() of ubatch {len(ubatches)} returned false")
            ub = ctx.ubatch
            self._compute(ctx)
            if self.traced:
                ubatches.append(ubatch_record(ub))
            if not ctx.next():
                break
        return self._decode_result(0, None, ubatches)

    def _compute(self, ctx) -> None:
        """What the model graph does with the memory when it computes an applied ubatch, as far as
        it changes the memory: the recurrent layers read ``s_copy`` for every slot cell (which
        consumes pending rollbacks, spec §5.12 / Q12) and their input states (``get_r``/``get_s``:
        zeroing of ``rs_z`` and the extra-cell copies). Attention layers only write K/V rows."""
        recr = ctx if isinstance(ctx, llmem.RecurrentContext) else getattr(ctx, "recr", None)
        attn = None if isinstance(ctx, llmem.RecurrentContext) else getattr(ctx, "attn", ctx)
        if self.fake_data and attn is not None:
            self._fake_attention(attn, ctx.ubatch)
        if recr is None:
            return
        recr.s_copy_all()
        for il in self.shape.recurrent_layers:
            r_in, s_in = recr.get_r(il), recr.get_s(il)
            if self.fake_data:
                recr.store_r(il, self._fake_states(il, r_in, ctx.ubatch))
                recr.store_s(il, self._fake_states(il + 1000, s_in, ctx.ubatch))

    # Stand-in model (fake_data): values are exact in f16/f32, so equal inputs give equal bytes.
    # K depends on (layer, token, position), V on (layer, token) - as layer 0 of the real models;
    # a recurrent state on (layer, input state, tokens) and not on positions, as Mamba / short conv.
    def _fake_attention(self, attn, ub) -> None:
        tok = ub.token.astype(np.int64)[:, None]
        pos = ub.pos.astype(np.int64)[: len(tok), None]
        for il in self.shape.attn_layers:
            jk = np.arange(self.shape.n_embd_k_gqa, dtype=np.int64)[None, :]
            jv = np.arange(self.shape.n_embd_v_gqa, dtype=np.int64)[None, :]
            k = ((il * 131 + tok * 17 + pos * 7 + jk) % 251).astype(np.float32) / 16 - 8
            v = ((il * 97 + tok * 29 + jv * 3) % 241).astype(np.float32) / 16 - 8
            attn.cpy_k(il, k)
            attn.cpy_v(il, v)

    def _fake_states(self, il: int, inp: np.ndarray, ub) -> np.ndarray:
        """New states of each seq set of an equal-split ubatch: ``h(state, token)`` token by token;
        the snapshot planes the model writes: min(T, 1 + n_rs_seq) (oracle README C3)."""
        n_seqs, nst = int(ub.n_seqs), int(ub.n_seq_tokens)
        tok = ub.token.astype(np.int64).reshape(n_seqs, nst)
        width = inp.shape[1]
        j = np.arange(width, dtype=np.int64)[None, :]
        state = inp.astype(np.int64)
        after = [state]
        for t in range(nst):
            state = (state * 3 + tok[:, t:t + 1] + 1 + j + il) % 1009
            after.append(state)
        n_rs_seq = self.mem.n_rs_seq if isinstance(self.mem, llmem.RecurrentMemory) else self.mem.mem_recr.n_rs_seq
        k = min(nst, 1 + n_rs_seq)
        planes = np.stack([after[nst - d] for d in range(k)]).astype(inp.dtype)
        return planes[0] if k == 1 else planes

    def _decode_result(self, ret: int, why: Optional[str], ubatches: Optional[list] = None) -> Dict[str, Any]:
        out: Dict[str, Any] = {"ret": ret}
        if why:
            out["why"] = why  # llmem's reason, for people (llama.cpp's "log" is not compared)
        if self.traced:
            out["ubatches"] = ubatches if ret == 0 else []
        return out

    # -- sequence ops --------------------------------------------------------------------------
    def _op_seq_rm(self, i, s):
        return {"ret": bool(self.mem.seq_rm(s["seq"], s.get("p0", -1), s.get("p1", -1)))}

    def _op_seq_cp(self, i, s):
        try:
            self.mem.seq_cp(s["src"], s["dst"], s.get("p0", -1), s.get("p1", -1))
        except ValueError as exc:
            # deviation R16: llmem refuses a ranged copy that would pair positions with the wrong
            # recurrent state; llama.cpp ignores the range, which the whole-range copy reproduces
            if "wrong state" not in str(exc):
                raise
            self.mem.seq_cp(s["src"], s["dst"], -1, -1)
        return {}

    def _op_seq_keep(self, i, s):
        self.mem.seq_keep(s["seq"])
        return {}

    def _op_seq_add(self, i, s):
        self.mem.seq_add(s["seq"], s.get("p0", -1), s.get("p1", -1), s["delta"])
        return {}

    def _op_seq_div(self, i, s):
        self.mem.seq_div(s["seq"], s.get("p0", -1), s.get("p1", -1), s["d"])
        return {}

    def _op_clear(self, i, s):
        self.mem.clear(bool(s.get("data", True)))
        return {}

    def _op_pos(self, i, s):
        seqs = list(s["seqs"])
        return {"seqs": seqs,
                "min": [int(self.mem.seq_pos_min(q)) for q in seqs],
                "max": [int(self.mem.seq_pos_max(q)) for q in seqs]}

    def _op_can_shift(self, i, s):
        return {"ret": bool(self.mem.get_can_shift())}

    def _op_logits(self, i, s):
        return {}  # llmem runs no model: nothing to observe

    # -- state ---------------------------------------------------------------------------------
    def _blob_obs(self, i: int, data: bytes, parse: Callable[[bytes], Dict[str, Any]]) -> Dict[str, Any]:
        self.blobs[i] = data
        try:
            meta = parse(data)
        except ValueError as e:
            meta = {"parse_error": str(e)}
        return {"size": len(data), "n": len(data), "sha256": hashlib.sha256(data).hexdigest(), "meta": meta}

    def _op_state_seq_get(self, i, s):
        seq, flags = int(s["seq"]), int(s.get("flags", 0))
        body = bytes(self.mem.state_write(seq, flags))
        data = struct.pack("<Ii", STATE_SEQ_MAGIC, seq) + body
        return self._blob_obs(i, data, lambda d: parse_seq_state(d, self.kind, self.shape, flags))

    def _op_state_get(self, i, s):
        arch = self.shape.arch.encode()
        body = bytes(self.mem.state_write(-1, 0))
        data = struct.pack("<I", len(arch)) + arch + body
        return self._blob_obs(i, data, lambda d: parse_full_state(d, self.kind, self.shape))

    def _blob_from(self, i: int, s: Dict[str, Any]) -> bytes:
        src = s["from"]
        if src not in self.blobs:
            raise ValueError(f"step {i}: 'from' {src} is not an earlier state_*_get step")
        data = self.blobs[src]
        if "truncate" in s:
            data = data[: int(s["truncate"])]
        return data

    def _op_state_seq_set(self, i, s):
        data = self._blob_from(i, s)
        # llama_state_seq_set_data: u32 magic and i32 seq id (ignored), then the memory's bytes;
        # a failure inside this header leaves the memory untouched
        if len(data) < 8:
            return {"ret": 0, "why": f"header: {len(data)} bytes"}
        magic = struct.unpack_from("<I", data, 0)[0]
        if magic != STATE_SEQ_MAGIC:
            return {"ret": 0, "why": f"header: bad magic {magic:#x}"}
        try:
            self.mem.state_read(data[8:], int(s["seq"]), int(s.get("flags", 0)))
        except StateError as e:
            return {"ret": 0, "why": f"StateError: {e}"}
        return {"ret": len(data)}

    def _op_state_set(self, i, s):
        data = self._blob_from(i, s)
        # llama_state_set_data: u32 length + arch name (must match), then the memory's bytes
        arch = self.shape.arch.encode()
        if len(data) < 4:
            return {"ret": 0, "why": "arch: truncated"}
        n = struct.unpack_from("<I", data, 0)[0]
        if len(data) < 4 + n or data[4:4 + n] != arch:
            return {"ret": 0, "why": "arch: missing or different"}
        try:
            self.mem.state_read(data[4 + n:], -1, 0)
        except StateError as e:
            return {"ret": 0, "why": f"StateError: {e}"}
        return {"ret": len(data)}


__all__ = ["MODELS", "ModelShape", "context_sizes", "HybridUnavailable", "DecodeRefused", "LlmemRunner", "build_memory",
           "parse_seq_state", "parse_full_state", "ubatch_record"]
