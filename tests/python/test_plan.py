"""The memory plan: llama.cpp's sizes, kinds and log lines, and the constructor arguments."""

import numpy as np
import pytest

from gguf_models import MODELS, NEMOTRON_H_8B_PATTERN, write_gguf
from llmem import Compat, ModelHParams, SWAType, from_gguf, from_hparams, plan_memory, read_gguf_hparams
from llmem.plan import resolve_dtype

MiB = 1024 * 1024


def pad256(x):
    return (x + 255) // 256 * 256


def load(tmp_path, name, **kw):
    return read_gguf_hparams(write_gguf(tmp_path, name, **kw))


# -- context sizes -----------------------------------------------------------------------------

@pytest.mark.parametrize("n_ctx,n_seq,unified,cells,n_ctx_total", [
    (1000, 1, True, 1024, 1024),
    (4096, 4, True, 4096, 4096),
    (256, 3, False, 256, 768),       # oracle README: n_ctx 256 with 3 seqs gives 768
    (513, 2, False, 512, 1024),      # padded first (768), then divided (384), then padded
    (1000, 3, False, 512, 1536),
    (8192, 4, False, 2048, 8192),
])
def test_context_padding(tmp_path, n_ctx, n_seq, unified, cells, n_ctx_total):
    plan = plan_memory(load(tmp_path, "llama32_1b"), n_ctx, n_seq, unified=unified)
    assert plan.n_ctx_seq == plan.kv.kv_size == cells and plan.n_ctx == n_ctx_total
    assert plan.kv.n_stream == (1 if unified else n_seq)


def test_zero_ctx_means_training_context(tmp_path):
    plan = plan_memory(load(tmp_path, "gemma2_2b"), 0)
    assert plan.n_ctx == 8192


def test_batch_follows_requested_context(tmp_path):
    plan = plan_memory(load(tmp_path, "llama32_1b"), 100)
    assert (plan.n_ctx, plan.n_batch, plan.n_ubatch) == (256, 100, 100)
    plan = plan_memory(load(tmp_path, "llama32_1b"), 4096, n_batch=64, n_ubatch=512)
    assert (plan.n_batch, plan.n_ubatch) == (64, 64)


# -- per-model figures, against formulas written out here ---------------------------------------

def kv_bytes(n_layers, n_embd_gqa, cells, n_stream=1, elem=2):
    return n_layers * n_embd_gqa * cells * n_stream * elem


def test_llama32_1b_figures(tmp_path):
    plan = plan_memory(load(tmp_path, "llama32_1b"), 8192)
    assert plan.kind == "kv" and plan.kv_swa is None and plan.recurrent is None
    k = kv_bytes(16, 8 * 64, 8192)
    assert plan.kv.k.nbytes == plan.kv.v.nbytes == k == 128 * MiB
    assert plan.buffers() == {"kv.K": k, "kv.V": k} and plan.nbytes == 2 * k
    assert plan.log_lines() == [
        "llama_kv_cache: size =  256.00 MiB (  8192 cells,  16 layers,  1/1 seqs), "
        "K (f16):  128.00 MiB, V (f16):  128.00 MiB"]
    # non-unified: one stream per sequence of n_ctx_seq cells
    plan = plan_memory(load(tmp_path, "llama32_1b"), 8192, 4, unified=False, type_k="f32",
                       type_v="bf16", flash_attn=True)
    assert plan.kv.k.nbytes == kv_bytes(16, 512, 2048, 4, elem=4)
    assert plan.kv.v.nbytes == kv_bytes(16, 512, 2048, 4, elem=2)
    assert plan.kv.log_line() == (
        "llama_kv_cache: size =  384.00 MiB (  2048 cells,  16 layers,  4/4 seqs), "
        "K (f32):  256.00 MiB, V (bf16):  128.00 MiB")
    assert not plan.v_trans and plan.kv.v.type_id == 30 and plan.kv.k.type_id == 0


def test_gemma3_1b_iswa_sizes(tmp_path):
    hp = load(tmp_path, "gemma3_1b")
    plan = plan_memory(hp, 32768)
    assert plan.kind == "iswa"
    assert plan.kv.layers == (5, 11, 17, 23) and len(plan.kv_swa.layers) == 22
    swa_cells = pad256(min(32768, 512 * 1 + 512))
    assert plan.kv.kv_size == 32768 and plan.kv_swa.kv_size == swa_cells == 1024
    assert plan.kv.nbytes == 2 * kv_bytes(4, 256, 32768)
    assert plan.kv_swa.nbytes == 2 * kv_bytes(22, 256, 1024)
    assert plan.kv.swa_type == SWAType.NONE and plan.kv.n_swa == 0
    assert plan.kv_swa.swa_type == SWAType.STANDARD and plan.kv_swa.n_swa == 512
    assert plan.log_lines() == [
        "llama_kv_cache_iswa: creating non-SWA KV cache, size = 32768 cells",
        "llama_kv_cache: size =  128.00 MiB ( 32768 cells,   4 layers,  1/1 seqs), "
        "K (f16):   64.00 MiB, V (f16):   64.00 MiB",
        "llama_kv_cache_iswa: creating     SWA KV cache, size = 1024 cells",
        "llama_kv_cache: size =   22.00 MiB (  1024 cells,  22 layers,  1/1 seqs), "
        "K (f16):   11.00 MiB, V (f16):   11.00 MiB"]
    assert not plan.can_shift  # the two caches differ in size
    # a unified cache multiplies the window by the sequence count; per-seq streams do not
    assert plan_memory(hp, 32768, 4).kv_swa.kv_size == pad256(min(32768, 512 * 4 + 512))
    assert plan_memory(hp, 32768, 4, unified=False).kv_swa.kv_size == pad256(8192 // 8 + 0) \
        == pad256(min(8192, 512 + 512))
    full = plan_memory(hp, 32768, swa_full=True)
    assert full.kv_swa.kv_size == 32768 and full.can_shift


def test_gemma2_2b_window_larger_than_context(tmp_path):
    plan = plan_memory(load(tmp_path, "gemma2_2b"), 2048)
    assert plan.kv_swa.kv_size == pad256(min(2048, 4096 + 512)) == 2048
    assert plan.can_shift  # same size: llama.cpp allows shifting


def test_mamba_130m_figures(tmp_path):
    plan = plan_memory(load(tmp_path, "mamba_130m"), 4096, 3)
    r = plan.recurrent
    assert plan.kind == "recurrent" and plan.kv is None and r.mem_size == 3
    assert r.r.nbytes == 24 * 3 * 1536 * 3 * 4 and r.s.nbytes == 24 * 16 * 1536 * 3 * 4
    assert r.log_line() == (
        "llama_memory_recurrent: size =    8.02 MiB (     3 cells,  24 layers,  3 seqs  0 rs_seq),"
        " R (f32):    1.27 MiB, S (f32):    6.75 MiB, P (f32):    0.00 MiB")
    assert plan.can_shift
    # rollback snapshots multiply the rows
    r2 = plan_memory(load(tmp_path, "mamba_130m"), 4096, 1, n_rs_seq=3).recurrent
    assert r2.mem_size == 1 and r2.r.nbytes == 24 * 4608 * 4 * 4


def test_jamba_v01_hybrid_figures(tmp_path):
    plan = plan_memory(load(tmp_path, "jamba_v01"), 4096, 2)
    assert plan.kind == "hybrid"
    assert plan.kv.layers == (4, 12, 20, 28) and len(plan.recurrent.layers) == 28
    assert plan.kv.k.nbytes == kv_bytes(4, 1024, 4096)
    assert plan.recurrent.r.nbytes == 28 * (3 * 8192) * 2 * 4
    assert plan.recurrent.s.nbytes == 28 * (16 * 8192) * 2 * 4
    assert " 32 layers" in plan.recurrent.log_line()  # llama.cpp logs the model's layer count


def test_nemotron_h_8b_hybrid_figures(tmp_path):
    plan = plan_memory(load(tmp_path, "nemotron_h_8b"), 8192)
    attn = [i for i, c in enumerate(NEMOTRON_H_8B_PATTERN) if c == "*"]
    mamba = [i for i, c in enumerate(NEMOTRON_H_8B_PATTERN) if c == "M"]
    assert list(plan.kv.layers) == attn and list(plan.recurrent.layers) == mamba
    assert plan.kv.nbytes == 2 * kv_bytes(4, 8 * 128, 8192)
    assert plan.recurrent.r.nbytes == 24 * 3 * (8192 + 2 * 8 * 128) * 4
    assert plan.recurrent.s.nbytes == 24 * 128 * 8192 * 4 == 96 * MiB


def test_falcon_h1_both_memories_hold_every_layer(tmp_path):
    plan = plan_memory(load(tmp_path, "falcon_h1_05b"), 16384)
    assert plan.kv.layers == plan.recurrent.layers == tuple(range(36))
    assert plan.kv.k.nbytes == kv_bytes(36, 2 * 64, 16384)
    assert plan.recurrent.s.nbytes == 36 * 128 * 1536 * 4


def test_qwen3next_80b_figures(tmp_path):
    plan = plan_memory(load(tmp_path, "qwen3next_80b"), 4096)
    assert plan.kv.layers == tuple(range(3, 48, 4))
    assert plan.kv.k.nbytes == kv_bytes(12, 2 * 256, 4096)
    assert plan.recurrent.log_line() == (
        "llama_memory_recurrent: size =   75.38 MiB (     1 cells,  48 layers,  1 seqs  0 rs_seq),"
        " R (f32):    3.38 MiB, S (f32):   72.00 MiB, P (f32):    0.00 MiB")


def test_lfm2_350m_hybrid_and_hybrid_iswa(tmp_path):
    plan = plan_memory(load(tmp_path, "lfm2_350m"), 4096)
    assert plan.kind == "hybrid" and plan.recurrent.s.nbytes == 0
    assert plan.recurrent.r.nbytes == 10 * 1024 * 2 * 4
    swa = plan_memory(load(tmp_path, "lfm2_350m", attention__sliding_window=512), 4096)
    assert swa.kind == "hybrid_iswa"
    assert swa.kv.layers == () and swa.kv.nbytes == 0 and swa.kv.kv_size == 4096
    assert swa.kv_swa.kv_size == pad256(512 + 512) and len(swa.kv_swa.layers) == 6


def test_granite_h_tiny_figures(tmp_path):
    plan = plan_memory(load(tmp_path, "granite_h_tiny"), 131072, 1)
    assert plan.kv.nbytes == 2 * kv_bytes(4, 4 * 128, 131072)
    assert plan.recurrent.r.nbytes == 36 * 3 * (3072 + 256) * 4


# -- llama.cpp's own numbers -------------------------------------------------------------------
# The log lines below were printed by llama.cpp (0c1e570, through llama-cpp-python 0.3.36) for
# the oracle's tiny models (/work/shared/oracle/make_models.py); the hyper-parameters are those
# models'.

TINY_LLAMA = dict(arch="llama", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ctx_train=4096)
TINY_GEMMA2 = dict(arch="gemma2", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ctx_train=4096,
                   n_swa=16, swa_type=SWAType.STANDARD, swa_layers=(True, False))


@pytest.mark.parametrize("hp,kw,lines", [
    (TINY_LLAMA, dict(n_ctx=1000), [
        "llama_kv_cache: size =    0.25 MiB (  1024 cells,   2 layers,  1/1 seqs), "
        "K (f16):    0.12 MiB, V (f16):    0.12 MiB"]),
    (TINY_LLAMA, dict(n_ctx=513, n_seq_max=2, unified=False), [
        "llama_kv_cache: size =    0.25 MiB (   512 cells,   2 layers,  2/2 seqs), "
        "K (f16):    0.12 MiB, V (f16):    0.12 MiB"]),
    (TINY_GEMMA2, dict(n_ctx=1000, n_seq_max=3), [
        "llama_kv_cache_iswa: creating non-SWA KV cache, size = 1024 cells",
        "llama_kv_cache: size =    0.12 MiB (  1024 cells,   1 layers,  3/1 seqs), "
        "K (f16):    0.06 MiB, V (f16):    0.06 MiB",
        "llama_kv_cache_iswa: creating     SWA KV cache, size = 768 cells",
        "llama_kv_cache: size =    0.09 MiB (   768 cells,   1 layers,  3/1 seqs), "
        "K (f16):    0.05 MiB, V (f16):    0.05 MiB"]),
    (TINY_GEMMA2, dict(n_ctx=1000, n_seq_max=3, unified=False, flash_attn=True, n_batch=64,
                       n_ubatch=32), [
        "llama_kv_cache_iswa: creating non-SWA KV cache, size = 512 cells",
        "llama_kv_cache: size =    0.19 MiB (   512 cells,   1 layers,  3/3 seqs), "
        "K (f16):    0.09 MiB, V (f16):    0.09 MiB",
        "llama_kv_cache_iswa: creating     SWA KV cache, size = 256 cells",
        "llama_kv_cache: size =    0.09 MiB (   256 cells,   1 layers,  3/3 seqs), "
        "K (f16):    0.05 MiB, V (f16):    0.05 MiB"]),
    (dict(arch="mamba", n_layer=2, n_embd=32, ssm_d_conv=4, ssm_d_inner=64, ssm_d_state=16,
          ssm_dt_rank=4), dict(n_ctx=1000), [
        "llama_memory_recurrent: size =    0.01 MiB (     1 cells,   2 layers,  1 seqs  0 rs_seq), "
        "R (f32):    0.00 MiB, S (f32):    0.01 MiB, P (f32):    0.00 MiB"]),
])
def test_matches_llama_cpp_log(hp, kw, lines):
    assert plan_memory(ModelHParams(**hp), **kw).log_lines() == lines


def test_transposed_v_is_padded_to_the_widest_layer():
    # llama.cpp sizes transposed V with the widest V row of the whole model
    hp = ModelHParams(arch="llama", n_layer=2, n_embd=64, n_head=4, n_head_kv=(4, 1))
    plan = plan_memory(hp, 256)
    assert plan.kv.k.nbytes == (64 + 16) * 256 * 2
    assert plan.kv.v.nbytes == (64 + 64) * 256 * 2 and plan.kv.v.row_elems == (64, 64)
    plan = plan_memory(hp, 256, flash_attn=True)
    assert plan.kv.v.nbytes == (64 + 16) * 256 * 2


# -- arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,name", [
    ("f16", "f16"), ("F32", "f32"), ("bfloat16", "bf16"), (1, "f16"), (0, "f32"), (30, "bf16"),
    (np.float16, "f16"), (np.dtype("float32"), "f32"),
])
def test_resolve_dtype(value, name):
    assert resolve_dtype(value) == name


@pytest.mark.parametrize("value", ["q3_k", 12, np.int32, True, "x"])
def test_resolve_dtype_rejects(value):
    with pytest.raises(ValueError, match="type_k"):
        resolve_dtype(value, "type_k")


def test_bad_arguments(tmp_path):
    hp = load(tmp_path, "llama32_1b")
    with pytest.raises(ValueError, match="n_seq_max"):
        plan_memory(hp, 4096, 0)
    with pytest.raises(ValueError, match="n_seq_max"):
        plan_memory(hp, 4096, 257)
    with pytest.raises(ValueError, match="n_ctx"):
        plan_memory(hp, -1)
    with pytest.raises(TypeError, match="n_ctx"):
        plan_memory(hp, 4096.0)
    with pytest.raises(ValueError, match="type_v"):
        plan_memory(hp, 4096, type_v="q8_0")
    with pytest.raises(TypeError, match="hparams"):
        plan_memory({"arch": "llama"}, 4096)


def test_to_dict_is_json_ready(tmp_path):
    import json

    d = json.loads(json.dumps(plan_memory(load(tmp_path, "jamba_v01"), 4096).to_dict()))
    assert d["kind"] == "hybrid" and [c["name"] for c in d["components"]] == ["kv", "recurrent"]
    assert d["total_bytes"] == sum(b["bytes"] for c in d["components"] for b in c["buffers"])


# -- constructor arguments ----------------------------------------------------------------------

def test_constructor_kwargs_kv(tmp_path):
    plan = plan_memory(load(tmp_path, "llama32_1b"), 4096, 2, unified=False, flash_attn=True)
    kw = plan.constructor_kwargs()
    assert set(kw) == {"kv"}
    kv = kw["kv"]
    assert kv == dict(n_layer=16, n_embd_k_gqa=[512] * 16, n_embd_v_gqa=[512] * 16, kv_size=2048,
                      n_seq_max=2, dtype_k=np.dtype(np.float16), dtype_v=np.dtype(np.float16),
                      v_trans=False, unified=False, n_pad=1, n_swa=0, swa_type=SWAType.NONE,
                      layer_filter=list(range(16)),
                      rope={"n_rot": 64, "freq_base": 500000.0, "freq_scale": 1.0,
                            "mode": "normal"},
                      compat=Compat.B11549, n_rot_k=0, n_rot_v=0, layer_reuse=None)


def test_constructor_kwargs_iswa(tmp_path):
    plan = plan_memory(load(tmp_path, "gemma3_1b"), 8192, 2, n_ubatch=256, type_k="f32")
    kw = plan.constructor_kwargs()
    assert set(kw) == {"iswa"}
    iswa = kw["iswa"]
    assert iswa["kv_size"] == 8192 and iswa["n_swa"] == 512
    assert iswa["swa_type"] == SWAType.STANDARD and iswa["swa_full"] is False
    assert iswa["n_ubatch"] == 256 and iswa["n_seq_max"] == 2 and iswa["unified"] is True
    assert iswa["is_swa_layer"] == [il % 6 != 5 for il in range(26)]
    assert iswa["layer_filter"] == list(range(26))
    assert iswa["n_embd_k_gqa"] == [256] * 26 and iswa["dtype_k"] == np.dtype(np.float32)
    assert iswa["rope"]["freq_base"] == 1000000.0  # the global layers' base
    # the SWA size the iSWA cache derives from these arguments is the planned one
    window = iswa["n_swa"] * (iswa["n_seq_max"] if iswa["unified"] else 1) + iswa["n_ubatch"]
    assert pad256(min(iswa["kv_size"], window)) == plan.kv_swa.kv_size == 1280


def test_constructor_kwargs_recurrent(tmp_path):
    plan = plan_memory(load(tmp_path, "mamba2_130m"), 4096, 4)
    kw = plan.constructor_kwargs()
    assert set(kw) == {"recurrent"}
    assert kw["recurrent"] == dict(n_layer=24, n_embd_r=[3 * (1536 + 256)] * 24,
                                   n_embd_s=[128 * 1536] * 24, mem_size=4, n_seq_max=4,
                                   n_rs_seq=0, dtype_r=np.dtype(np.float32),
                                   dtype_s=np.dtype(np.float32), layer_filter=list(range(24)),
                                   compat=Compat.B11549)


def test_constructor_kwargs_hybrid(tmp_path):
    plan = plan_memory(load(tmp_path, "nemotron_h_8b"), 4096)
    kw = plan.constructor_kwargs()
    assert set(kw) == {"kv", "recurrent", "hybrid"}
    pat = NEMOTRON_H_8B_PATTERN
    assert kw["kv"]["layer_filter"] == [i for i, c in enumerate(pat) if c == "*"]
    assert kw["kv"]["n_embd_k_gqa"] == [1024 if c == "*" else 0 for c in pat]
    assert kw["kv"]["rope"] is None
    assert kw["recurrent"]["layer_filter"] == [i for i, c in enumerate(pat) if c == "M"]
    assert kw["recurrent"]["n_embd_r"] == [3 * (8192 + 2048) if c == "M" else 0 for c in pat]
    assert kw["hybrid"] == {"is_recurrent_layer": [c == "M" for c in pat]}


def test_constructor_kwargs_hybrid_iswa(tmp_path):
    plan = plan_memory(load(tmp_path, "lfm2_350m", attention__sliding_window=512), 4096)
    kw = plan.constructor_kwargs()
    assert set(kw) == {"iswa", "recurrent", "hybrid"}
    assert kw["iswa"]["layer_filter"] == [2, 5, 8, 10, 12, 14]
    assert kw["iswa"]["is_swa_layer"] == [il in (2, 5, 8, 10, 12, 14) for il in range(16)]
    assert kw["recurrent"]["n_embd_s"] == [0] * 16


# -- factory ------------------------------------------------------------------------------------

class Recorder:
    """Stands in for a memory class: remembers its name and keyword arguments."""

    def __init__(self, name):
        self.name = name

    def __call__(self, **kwargs):
        return (self.name, kwargs)


FAKE = {name: Recorder(name) for name in
        ("KVCache", "KVCacheISWA", "RecurrentMemory", "HybridMemory", "HybridISWAMemory")}


@pytest.mark.parametrize("model,extra,top", [
    ("llama32_1b", {}, "KVCache"),
    ("gemma3_1b", {}, "KVCacheISWA"),
    ("mamba_130m", {}, "RecurrentMemory"),
    ("jamba_v01", {}, "HybridMemory"),
    ("lfm2_350m", {"attention__sliding_window": 512}, "HybridISWAMemory"),
])
def test_from_hparams_with_fake_classes(tmp_path, model, extra, top):
    hp = load(tmp_path, model, **extra)
    name, kwargs = from_hparams(hp, 4096, 2, classes=FAKE, unified=False)
    assert name == top
    kw = plan_memory(hp, 4096, 2, unified=False).constructor_kwargs()
    if top == "HybridMemory":
        assert kwargs == {"attn": ("KVCache", kw["kv"]),
                          "recr": ("RecurrentMemory", kw["recurrent"]), **kw["hybrid"]}
    elif top == "HybridISWAMemory":
        assert kwargs == {"attn": ("KVCacheISWA", kw["iswa"]),
                          "recr": ("RecurrentMemory", kw["recurrent"]), **kw["hybrid"]}
    else:
        assert kwargs == next(iter(kw.values()))


def test_from_gguf_with_fake_classes(tmp_path):
    path = write_gguf(tmp_path, "qwen3next_80b")
    name, kwargs = from_gguf(path, 1024, classes=FAKE, type_k="bf16", flash_attn=True)
    assert name == "HybridMemory"
    assert kwargs["attn"][1]["v_trans"] is False and kwargs["attn"][1]["kv_size"] == 1024
    assert kwargs["recr"][1]["mem_size"] == 1


EXPECTED_CLASS = {"kv": "KVCache", "iswa": "KVCacheISWA", "recurrent": "RecurrentMemory",
                  "hybrid": "HybridMemory", "hybrid_iswa": "HybridISWAMemory"}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("unified", [True, False])
def test_from_gguf_builds_the_planned_memory(tmp_path, model, unified):
    """The real classes: the memory built for every test model is of the planned kind and holds
    exactly the planned bytes (what llama.cpp logs), so the plan and the memory cannot drift."""
    import llmem

    path = write_gguf(tmp_path, model)
    plan = plan_memory(read_gguf_hparams(path), 512, 2, unified=unified, n_ubatch=64)
    mem = llmem.from_gguf(path, 512, 2, unified=unified, n_ubatch=64)
    assert type(mem).__name__ == EXPECTED_CLASS[plan.kind]
    assert sum(mem.memory_breakdown().values()) == plan.nbytes
    assert mem.n_seq_max == 2
