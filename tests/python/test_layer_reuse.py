"""Layer reuse (llama.cpp's layer_reuse_cb; Gemma3n, Gemma4): a layer that reads another layer's
K/V has no buffers of its own, is not in the state bytes, and writes nothing."""
from __future__ import annotations

import numpy as np
import pytest

import llmem
from llmem import KVCache, KVCacheISWA, SWAType
from llmem.hparams import ModelHParams, hparams_from_metadata
from llmem.plan import plan_memory


def test_reusing_layer_reads_the_source_buffers() -> None:
    cache = KVCache(4, 32, 32, kv_size=8, layer_reuse=[-1, -1, 0, 1])
    assert cache.layers == [0, 1]
    assert cache.reused_layers == {2: 0, 3: 1}
    assert cache.k(2) is cache.k(0) and cache.v(3) is cache.v(1)
    assert cache.memory_breakdown()["CPU"] == 2 * 8 * (32 + 32) * 2
    batch = llmem.Batch(token=np.arange(3, dtype=np.int32))
    ctx = cache.init_batch(batch, n_ubatch=3)
    for _ub in ctx:
        for il in (0, 1):
            ctx.cpy_k(il, np.full((3, 32), il + 1.0, np.float32))
            ctx.cpy_v(il, np.full((3, 32), il + 1.0, np.float32))
        np.testing.assert_array_equal(ctx.get_k(2), ctx.get_k(0))
        np.testing.assert_array_equal(ctx.get_v_float(3), ctx.get_v_float(1))
        with pytest.raises(ValueError, match="reuses"):
            ctx.cpy_k(2, np.zeros((3, 32), np.float32))
    # the state bytes hold the two stored layers, as llama.cpp's (n_layer = layers.size())
    plain = KVCache(2, 32, 32, kv_size=8)
    plain.state_read(cache.state_write())
    np.testing.assert_array_equal(plain.k(1), cache.k(3))


def test_bad_reuse_maps() -> None:
    with pytest.raises(ValueError, match="does not store"):
        KVCache(3, 32, 32, kv_size=8, layer_reuse=[-1, 2, -1], layer_filter=lambda il: il != 2)
    with pytest.raises(ValueError, match="itself"):
        KVCache(2, 32, 32, kv_size=8, layer_reuse=[-1, 1])
    with pytest.raises(ValueError, match="own K/V"):
        KVCache(3, 32, 32, kv_size=8, layer_reuse=[-1, 0, 1])
    with pytest.raises(ValueError, match="entries"):
        KVCache(3, 32, 32, kv_size=8, layer_reuse=[-1, 0])


def _gemma3n_meta(n_layer: int = 30) -> dict:
    return {"general.architecture": "gemma3n", "gemma3n.context_length": 32768,
            "gemma3n.embedding_length": 2048, "gemma3n.block_count": n_layer,
            "gemma3n.attention.head_count": 8, "gemma3n.attention.head_count_kv": 2,
            "gemma3n.attention.key_length": 256, "gemma3n.attention.value_length": 256,
            "gemma3n.feed_forward_length": 8192, "gemma3n.attention.sliding_window": 512}


def test_gemma3n_reuse_rule_and_plan() -> None:
    hp = hparams_from_metadata(_gemma3n_meta())
    # 4 sliding layers then a full one; from layer 20 on, sliding layers read 18, full ones 19
    assert [hp.is_swa_layer(il) for il in range(5)] == [True, True, True, True, False]
    assert [hp.layer_reuse(il) for il in (0, 19, 20, 23, 24, 29)] == [-1, -1, 18, 18, 19, 19]
    plan = plan_memory(hp, 4096)
    assert plan.kind == "iswa"
    assert plan.kv.layers == (4, 9, 14, 19) and len(plan.kv_swa.layers) == 16
    assert dict(plan.kv.reuse) == {24: 19, 29: 19}
    assert len(plan.kv_swa.reuse) == 8
    mem = llmem.from_hparams(hp, 4096)
    assert isinstance(mem, KVCacheISWA)
    assert mem.base.reused_layers == {24: 19, 29: 19}
    assert mem.k(27) is mem.k(18)
    assert mem.layers == sorted(plan.kv.layers + plan.kv_swa.layers)
    # sizes count stored layers only: 20 layers of 2 x 256 x 2 bytes (K and V, f16) per cell
    assert plan.kv.nbytes == 4 * 4096 * 2 * 512 * 2


def test_gemma4_rule_from_hparams() -> None:
    hp = ModelHParams(arch="gemma4", n_layer=6, n_embd=64, n_head=2, n_head_kv=1, n_ctx_train=4096,
                      swa_layers=[True, True, False, True, True, False], n_swa=8,
                      swa_type=SWAType.STANDARD, n_layer_kv_from_start=3)
    assert [hp.layer_reuse(il) for il in range(6)] == [-1, -1, -1, 1, 1, 2]
