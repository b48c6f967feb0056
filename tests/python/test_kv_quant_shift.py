"""The K-shift of a quantized K against a slow numpy reference written here: with llama.cpp
b11549's attention rotation (n_rot_k > 0: undo the Hadamard rotation over chunks of n_rot_k values,
RoPE, rotate again; llama-kv-cache.cpp build_rope_shift) and without it (only the blocks holding the
first n_rot values of each head change, as llama.cpp's shift views exactly those)."""
from __future__ import annotations

import numpy as np
import pytest

import llmem
from llmem import KVCache, Rope, Status
from llmem.ggml_types import GGML_TYPES, dequantize, quantize


def _fill(cache: KVCache, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    batch = llmem.Batch(token=np.arange(n, dtype=np.int32), seq_id=np.zeros(n, np.int32))
    ctx = cache.init_batch(batch, n_ubatch=n)
    assert ctx.status == Status.SUCCESS and ctx.apply()
    for il in cache.layers:
        ctx.cpy_k(il, rng.standard_normal((n, cache._n_embd_k(il))).astype(np.float32))
        ctx.cpy_v(il, rng.standard_normal((n, cache._n_embd_v(il))).astype(np.float32))


def hadamard(n: int) -> np.ndarray:
    """ggml_gen_hadamard's matrix: Sylvester's construction scaled by 1/sqrt(n)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rope_rows(x: np.ndarray, head_dim: int, n_rot: int, delta: int, base: float, mode: str) -> np.ndarray:
    """ggml_rope_ext (no YaRN) of the first n_rot values of every head, in float64."""
    out = x.astype(np.float64).copy()
    heads = out.reshape(len(x), -1, head_dim)
    k = np.arange(n_rot // 2)
    theta = delta * base ** (-2.0 * k / n_rot)
    c, s = np.cos(theta), np.sin(theta)
    if mode == "neox":
        a, b = heads[..., k].copy(), heads[..., k + n_rot // 2].copy()
        heads[..., k], heads[..., k + n_rot // 2] = a * c - b * s, a * s + b * c
    else:
        a, b = heads[..., 2 * k].copy(), heads[..., 2 * k + 1].copy()
        heads[..., 2 * k], heads[..., 2 * k + 1] = a * c - b * s, a * s + b * c
    return out


def reference_shift(raw: np.ndarray, qt: str, n_embd: int, head_dim: int, n_rot: int, n_rot_k: int,
                    delta: int, mode: str) -> np.ndarray:
    """Dequantize, undo the rotation, RoPE, rotate again, quantize (whole rows)."""
    x = dequantize(raw, qt, n_embd).astype(np.float64)
    if n_rot_k:
        h = hadamard(n_rot_k)
        x = (x.reshape(len(x), -1, n_rot_k) @ h).reshape(x.shape)  # h is symmetric: h @ chunk
    x = rope_rows(x, head_dim, n_rot, delta, 10000.0, mode)
    if n_rot_k:
        x = (x.reshape(len(x), -1, n_rot_k) @ h).reshape(x.shape)
    return quantize(x.astype(np.float32), qt)


def _close_in_steps(got: np.ndarray, want: np.ndarray, qt: str, n_embd: int) -> None:
    """Equal up to one quantization step where float rounding tips a value the other way: the
    dequantized values differ by at most the block's step, and nearly all bytes agree."""
    a, b = dequantize(got, qt, n_embd), dequantize(want, qt, n_embd)
    t = GGML_TYPES[qt]
    blocks = np.abs(b).reshape(len(b), -1, t.block_size).max(axis=2, keepdims=True)
    step = np.broadcast_to(blocks, (len(b), n_embd // t.block_size, t.block_size)).reshape(b.shape)
    # the largest gap between neighbouring levels, as a fraction of the block's largest magnitude
    gap = {"q8_0": 1 / 127, "q4_0": 1 / 8, "q4_1": 2 / 15, "q5_0": 1 / 16, "q5_1": 2 / 31, "iq4_nl": 24 / 127}[qt]
    assert np.all(np.abs(a - b) <= step * gap * 1.05 + 1e-6)
    assert np.mean(got == want) > 0.97


@pytest.mark.parametrize("qt", ["q8_0", "q4_0", "q5_1", "iq4_nl"])
@pytest.mark.parametrize("mode", ["normal", "neox"])
@pytest.mark.parametrize("head_dim,n_rot,n_rot_k", [(64, 64, 64), (128, 128, 128), (128, 64, 128), (128, 128, 64)])
def test_hadamard_k_shift_matches_the_reference(qt, mode, head_dim, n_rot, n_rot_k):
    n_embd = 2 * head_dim
    rope = Rope(n_rot, head_dim=head_dim, mode=mode)
    cache = KVCache(1, n_embd, n_embd, kv_size=16, dtype_k=qt, dtype_v=qt, v_trans=False, rope=rope,
                    n_rot_k=n_rot_k, n_rot_v=64)
    _fill(cache, 12, seed=head_dim + n_rot_k)
    before = cache.k(0)[0].copy()
    cache.seq_add(0, 4, -1, 7)
    assert cache.init_update().apply()
    after = cache.k(0)[0]
    np.testing.assert_array_equal(after[:4], before[:4])  # unshifted rows keep their bytes
    want = reference_shift(before[4:12], qt, n_embd, head_dim, n_rot, n_rot_k, 7, mode)
    _close_in_steps(after[4:12], want, qt, n_embd)
    assert not cache.get_has_shift()


@pytest.mark.parametrize("qt", ["q8_0", "q4_1"])
def test_partial_rope_converts_only_the_rotated_blocks(qt):
    # n_rot 32 of head_dim 96: blocks [0, 32) of each head are rotated, [32, 96) keep their bytes
    t = GGML_TYPES[qt]
    rope = Rope(32, head_dim=96)
    cache = KVCache(1, 192, 64, kv_size=8, dtype_k=qt, rope=rope)
    _fill(cache, 6, seed=3)
    before = cache.k(0)[0].copy()
    cache.seq_add(0, 0, -1, 3)
    cache.init_update().apply()
    after = cache.k(0)[0, :6]
    bpb = t.type_size  # bytes per block; 3 blocks per head
    for h in range(2):
        kept = slice((3 * h + 1) * bpb, (3 * h + 3) * bpb)
        np.testing.assert_array_equal(after[:, kept], before[:6, kept])
    want = reference_shift(before[:6], qt, 192, 96, 32, 0, 3, "normal")
    _close_in_steps(after, want, qt, 192)


def test_shift_there_and_back_stays_within_quantization_error():
    rope = Rope(128, head_dim=128)
    cache = KVCache(1, 256, 256, kv_size=8, dtype_k="q8_0", dtype_v="q8_0", v_trans=False, rope=rope,
                    n_rot_k=128, n_rot_v=64)
    _fill(cache, 8, seed=9)
    x0 = dequantize(cache.k(0)[0, :8].copy(), "q8_0", 256)
    cache.seq_add(0, 0, -1, 37)
    cache.init_update().apply()
    cache.seq_add(0, 0, -1, -37)
    cache.init_update().apply()
    x1 = dequantize(cache.k(0)[0, :8], "q8_0", 256)
    assert np.max(np.abs(x1 - x0)) < 4 * np.abs(x0).max() / 127


@pytest.mark.parametrize("n_rot_k", [48, 256])
def test_bad_rotation_size_is_refused_and_changes_nothing(n_rot_k):
    rope = Rope(64, head_dim=128)
    cache = KVCache(1, 128, 128, kv_size=8, dtype_k="q8_0", dtype_v="q8_0", v_trans=False, rope=rope,
                    n_rot_k=n_rot_k)
    _fill(cache, 4)
    before = cache.k(0).copy()
    cache.seq_add(0, 0, -1, 2)
    with pytest.raises(llmem.LlmemError, match=f"n_rot_k {n_rot_k} must be a power of two .at least 4. dividing the head size 128"):
        cache.init_update().apply()
    np.testing.assert_array_equal(cache.k(0), before)
    assert cache.get_has_shift()
    with pytest.raises(llmem.LlmemError, match="n_rot_k"):
        cache.state_write()  # the pending shift would be written as applied


def test_pending_hadamard_shift_is_saved_as_applied():
    rope = Rope(64, head_dim=64)

    def make():
        return KVCache(1, 128, 128, kv_size=8, dtype_k="q8_0", dtype_v="q8_0", v_trans=False, rope=rope,
                       n_rot_k=64, n_rot_v=64)

    a, b = make(), make()
    _fill(a, 5, seed=4)
    _fill(b, 5, seed=4)
    a.seq_add(0, 1, -1, 3)
    b.seq_add(0, 1, -1, 3)
    blob = a.state_write()  # rotates the shifted rows of the copy it writes
    b.init_update().apply()
    assert blob == b.state_write()
