"""Quantized K/V caches: ggml's block layout in the buffers, cpy_k/cpy_v quantizing as ggml does,
raw and dequantized reads, llama.cpp's rules, the K-shift through f32, the state bytes, and a toy
transformer decoding through a q8_0 cache."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import llmem
from llmem import KVCache, Rope, Status, StateError
from llmem.ggml_types import GGML_TYPES, dequantize, quantize
from llmem.toy import ToyTransformer
from llmem.toy.base import ATTN, ToyConfig

QTYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]


def _fill(cache: KVCache, n_tokens: int, seq: int = 0, seed: int = 0, p0: int = 0):
    """Decode n_tokens of one sequence, writing random K/V rows; returns the float rows written."""
    rng = np.random.default_rng(seed)
    batch = llmem.Batch(token=np.arange(n_tokens, dtype=np.int32),
                        pos=np.arange(p0, p0 + n_tokens, dtype=np.int32),
                        seq_id=np.full(n_tokens, seq, np.int32))
    ctx = cache.init_batch(batch, n_ubatch=n_tokens)
    assert ctx.status == Status.SUCCESS
    assert ctx.apply()  # one micro-batch: the context stays on it
    written = {}
    for il in cache.layers:
        k = rng.standard_normal((n_tokens, cache._n_embd_k(il))).astype(np.float32)
        v = rng.standard_normal((n_tokens, cache._n_embd_v(il))).astype(np.float32)
        ctx.cpy_k(il, k)
        ctx.cpy_v(il, v)
        written[il] = (k, v, ctx.k_idxs().copy())
    return ctx, written


@pytest.mark.parametrize("qt", QTYPES)
def test_buffers_hold_ggml_blocks(qt: str) -> None:
    t = GGML_TYPES[qt]
    cache = KVCache(2, 64, 96, kv_size=16, dtype_k=qt, dtype_v=qt, v_trans=False)
    assert cache.type_k == qt and cache.type_v == qt
    assert cache.k(0).shape == (1, 16, t.row_size(64)) and cache.k(0).dtype == np.uint8
    assert cache.v(1).shape == (1, 16, t.row_size(96))
    assert cache.memory_breakdown()["CPU"] == 2 * 16 * (t.row_size(64) + t.row_size(96))
    ctx, written = _fill(cache, 5)
    for il, (k, v, rows) in written.items():
        np.testing.assert_array_equal(cache.k(il)[0, rows], quantize(k, qt))
        np.testing.assert_array_equal(cache.v(il)[0, rows], quantize(v, qt))
        # raw view and the dequantizing read
        assert ctx.get_k(il).dtype == np.uint8
        kf = ctx.get_k_float(il)
        assert kf.shape == (1, ctx.n_kv, 64) and kf.dtype == np.float32
        np.testing.assert_array_equal(kf[0, rows], dequantize(quantize(k, qt), qt))
        np.testing.assert_array_equal(ctx.get_v_float(il)[0, rows], dequantize(quantize(v, qt), qt))


def test_mixed_types_and_float_reads() -> None:
    cache = KVCache(1, 32, 32, kv_size=8, dtype_k="q8_0", dtype_v=np.float16, v_trans=True)
    ctx, written = _fill(cache, 3)
    k, v, rows = written[0]
    assert ctx.get_v_float(0).shape == (1, 32, ctx.n_kv)
    np.testing.assert_array_equal(ctx.get_v_float(0)[0][:, rows].T, v.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(ctx.get_k_float(0)[0, rows], dequantize(quantize(k, "q8_0"), "q8_0"))


def test_llama_cpp_rules() -> None:
    with pytest.raises(ValueError, match="flash attention"):
        KVCache(1, 32, 32, kv_size=8, dtype_v="q8_0", v_trans=True)
    with pytest.raises(ValueError, match="multiple"):
        KVCache(1, 48, 48, kv_size=8, dtype_k="q4_0", v_trans=False)
    with pytest.raises(ValueError, match="q3_k"):
        KVCache(1, 32, 32, kv_size=8, dtype_k="q3_k")
    # quantized K with a transposed float V is what llama.cpp runs without flash attention
    KVCache(1, 32, 32, kv_size=8, dtype_k="q4_0", v_trans=True)
    cache = KVCache(1, 32, 32, kv_size=8, dtype_k="q8_0", dtype_v="q8_0", v_trans=False)
    ctx, _ = _fill(cache, 2)
    with pytest.raises(ValueError):
        ctx.cpy_k(0, np.zeros((2, 31), np.float32))
    with pytest.raises(TypeError, match="floats"):
        ctx.cpy_k(0, np.zeros((2, 32), np.int32))


@pytest.mark.parametrize("qt", ["q8_0", "q4_1", "iq4_nl"])
def test_state_bytes_use_quantized_row_sizes(qt: str) -> None:
    t = GGML_TYPES[qt]
    cache = KVCache(2, 64, 64, kv_size=16, dtype_k=qt, dtype_v=qt, v_trans=False, compat="b11312")
    _fill(cache, 3)
    blob = cache.state_write(0)
    # n_stream, cell_count, 3 cells (pos, n_seq, id), v_trans, n_layer, then layer 0 K: type, row size
    off = 4 + 4 + 3 * 12
    assert struct.unpack_from("<II", blob, off) == (0, 2)
    assert struct.unpack_from("<iQ", blob, off + 8) == (t.id, t.row_size(64))
    assert len(blob) == off + 8 + 2 * 2 * (12 + 3 * t.row_size(64))
    other = KVCache(2, 64, 64, kv_size=16, dtype_k=qt, dtype_v=qt, v_trans=False, compat="b11312")
    other.state_read(blob, 0)
    assert other.state_write(0) == blob
    # a cache of another type refuses the bytes and stays empty
    f16 = KVCache(2, 64, 64, kv_size=16, v_trans=False, compat="b11312")
    with pytest.raises(StateError, match="type"):
        f16.state_read(blob, 0)
    assert f16.used == 0


def _shifted_reference(k_rows: np.ndarray, rope: Rope, delta: int) -> np.ndarray:
    """The f32 rotation of the same dequantized rows, by llmem's own f32 K-shift."""
    ref = KVCache(1, k_rows.shape[1], 32, kv_size=len(k_rows), dtype_k=np.float32, rope=rope)
    ctx, _ = _fill(ref, len(k_rows))
    ctx.cpy_k(0, k_rows)
    ref.seq_add(0, 0, -1, delta)
    ref.init_update().apply()
    return ref.k(0)[0, :len(k_rows)].copy()


@pytest.mark.parametrize("qt", ["q8_0", "q4_0", "q5_1"])
def test_k_shift_dequantizes_rotates_requantizes(qt: str) -> None:
    rope = Rope(16, head_dim=32)
    cache = KVCache(1, 64, 32, kv_size=8, dtype_k=qt, dtype_v=np.float16, rope=rope)
    _fill(cache, 8)
    before = cache.k(0)[0].copy()
    cache.seq_add(0, 2, -1, 5)  # cells 2..7 move by 5
    assert cache.init_update().apply()
    after = cache.k(0)[0]
    np.testing.assert_array_equal(after[:2], before[:2])  # unshifted rows are not requantized
    want = quantize(_shifted_reference(dequantize(before[2:], qt, 64), rope, 5), qt)
    np.testing.assert_array_equal(after[2:], want)


# the K-shift with b11549's attention rotation (n_rot_k > 0): test_kv_quant_shift.py


# -- a toy transformer through a q8_0 cache ---------------------------------------------------

def _toy() -> ToyTransformer:
    return ToyTransformer(3, ToyConfig(layer_kinds=(ATTN, ATTN, ATTN), head_dim=16))


def test_toy_decoding_through_q8_0_stays_within_quantization_error() -> None:
    model = _toy()
    tokens = list(np.random.default_rng(1).integers(0, model.config.n_vocab, 24))
    full = model.forward_full(tokens)
    mem = model.new_memory(64, dtype="q8_0", v_trans=False)
    out = [model.decode(llmem.Batch(token=np.array(tokens[:8], np.int32), output=np.ones(8, np.int8)), mem)]
    for i in range(8, len(tokens)):
        out.append(model.decode(llmem.Batch(token=np.array([tokens[i]], np.int32),
                                            pos=np.array([i], np.int32)), mem))
    got = np.concatenate(out)
    err = np.abs(got - full).max()
    scale = np.abs(full).max()
    assert 0 < err < 0.02 * scale, (err, scale)
    # f16 is much closer: the difference above is the quantization's
    mem16 = model.new_memory(64, dtype=np.float16, v_trans=False)
    got16 = model.decode(llmem.Batch(token=np.array(tokens, np.int32), output=np.ones(24, np.int8)), mem16)
    assert np.abs(got16 - full).max() < err


def _quantized_full(model: ToyTransformer, tokens, qt: str) -> np.ndarray:
    """forward_full with every K and V row passed through the cache type (quantize, dequantize):
    the recompute that quantizes the way the cache does."""
    orig = model._qkv

    def qkv(lw, h, pos):
        q, k, v = orig(lw, h, pos)
        n = len(h)
        k = dequantize(quantize(k.reshape(n, -1), qt), qt).reshape(k.shape)
        return q, k, dequantize(quantize(v, qt), qt)

    model._qkv = qkv
    try:
        return model.forward_full(tokens)
    finally:
        del model._qkv


@pytest.mark.parametrize("qt", ["q8_0", "q4_0"])
def test_toy_cached_equals_recompute_that_quantizes_the_same_way(qt: str) -> None:
    """Decoding through a quantized cache (prompt, then token by token) gives the logits of the
    whole history recomputed with K/V quantized the same way, to float32 rounding."""
    model = _toy()
    tokens = list(np.random.default_rng(2).integers(0, model.config.n_vocab, 16))
    mem = model.new_memory(32, dtype=qt, v_trans=False)
    outs = [model.decode(llmem.Batch(token=np.array(tokens[:6], np.int32), output=np.ones(6, np.int8)), mem)]
    outs += [model.decode(llmem.Batch(token=np.array([t], np.int32), pos=np.array([i], np.int32)), mem)
             for i, t in enumerate(tokens) if i >= 6]
    np.testing.assert_allclose(np.concatenate(outs), _quantized_full(model, tokens, qt), rtol=1e-4, atol=1e-5)


# -- planning with cache types ----------------------------------------------------------------

def test_plan_and_cli_with_quantized_cache_types(tmp_path, capsys) -> None:
    from gguf_models import write_gguf

    from llmem import cli
    from llmem.hparams import read_gguf_hparams
    from llmem.plan import plan_memory

    path = write_gguf(tmp_path, "llama32_1b")  # 16 layers, K/V rows of 8 heads x 64
    hp = read_gguf_hparams(path)
    plan = plan_memory(hp, 8192, type_k="q8_0", type_v="q8_0", flash_attn=True)
    assert plan.kv.k.nbytes == 16 * 8192 * 512 // 32 * 34
    assert "K (q8_0):   68.00 MiB, V (q8_0):   68.00 MiB" in plan.kv.log_line()
    q4 = plan_memory(hp, 8192, type_k="q4_0")  # a quantized K without flash attention is fine
    assert q4.kv.k.nbytes == 16 * 8192 * 512 // 32 * 18 and q4.kv.v.dtype == "f16"
    with pytest.raises(ValueError, match="flash_attn"):
        plan_memory(hp, 8192, type_v="q8_0")
    mem = llmem.from_gguf(path, 256, type_k="q5_1", type_v="iq4_nl", flash_attn=True)
    assert (mem.type_k, mem.type_v, mem.v_trans) == ("q5_1", "iq4_nl", False)
    assert mem.k(0).shape == (1, 256, 512 // 32 * 24)
    assert cli.main(["plan", str(path), "--ctx", "8192", "--type-k", "q8_0", "--type-v", "q8_0",
                     "--flash-attn", "--table"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["kv", "K", "q8_0", "8192", "1", "16", "68.00"] in rows
    assert cli.main(["plan", str(path), "--type-v", "q4_0"]) == 2
    assert "flash_attn" in capsys.readouterr().err
