"""Reading memory hyper-parameters from GGUF metadata (llama.cpp's per-architecture rules)."""

import pytest

from gguf_models import (GRANITE_H_TINY_ATTN, LFM2_350M_ATTN, MODELS, NEMOTRON_H_8B_PATTERN,
                         write_gguf, write_metadata)
from llmem import ModelHParams, SWAType, read_gguf_hparams


def load(tmp_path, name, **kw):
    return read_gguf_hparams(write_gguf(tmp_path, name, **kw))


def test_llama32_1b(tmp_path):
    hp = load(tmp_path, "llama32_1b")
    assert hp.arch == "llama" and hp.n_layer == 16 and hp.n_embd == 2048
    assert hp.n_embd_head_k == hp.n_embd_head_v == 2048 // 32
    assert all(hp.n_embd_k_gqa(il) == 8 * 64 == hp.n_embd_v_gqa(il) for il in range(16))
    assert not any(hp.is_recurrent(il) or hp.is_swa_layer(il) for il in range(16))
    assert hp.attention_layer_ids() == tuple(range(16))
    assert hp.n_embd_r(0) == hp.n_embd_s(0) == 0
    assert hp.memory_kind == "kv" and hp.can_shift and hp.swa_type == SWAType.NONE
    assert hp.rope() == {"n_rot": 64, "freq_base": 500000.0, "freq_scale": 1.0, "mode": "normal"}


def test_gemma3_1b_swa_pattern(tmp_path):
    hp = load(tmp_path, "gemma3_1b")
    # llama.cpp's set_swa_pattern(6): five sliding layers, then one global
    full = [il for il in range(26) if not hp.is_swa_layer(il)]
    assert full == [5, 11, 17, 23]
    assert hp.n_swa == 512 and hp.swa_type == SWAType.STANDARD and hp.memory_kind == "iswa"
    assert hp.n_embd_k_gqa(0) == 256 * 1
    # SWA layers rotate with gemma3's fixed local base, the global ones with the file's base
    assert hp.rope(0)["freq_base"] == 10000.0 and hp.rope(5)["freq_base"] == 1000000.0
    assert hp.rope(0)["mode"] == "neox"


def test_gemma3_without_window_is_plain_kv(tmp_path):
    hp = load(tmp_path, "gemma3_1b", drop=("attention.sliding_window",))
    assert hp.n_swa == 0 and not hp.is_swa_any() and hp.memory_kind == "kv"


def test_gemma2_2b_alternates(tmp_path):
    hp = load(tmp_path, "gemma2_2b")
    assert [hp.is_swa_layer(il) for il in range(4)] == [True, False, True, False]
    assert hp.n_swa == 4096 and hp.memory_kind == "iswa"
    # the window defaults to gemma2's 4096 when the key is absent
    assert load(tmp_path, "gemma2_2b", drop=("attention.sliding_window",)).n_swa == 4096


def test_mamba_130m(tmp_path):
    hp = load(tmp_path, "mamba_130m")
    assert hp.memory_kind == "recurrent" and hp.recurrent_layer_ids() == tuple(range(24))
    assert hp.attention_layer_ids() == () and hp.rope() is None
    assert hp.n_embd_r(0) == (4 - 1) * 1536            # conv taps x d_inner (no groups)
    assert hp.n_embd_s(23) == 16 * 1536                # d_state x d_inner
    assert hp.n_embd_head_k == 0 and hp.n_embd_k_gqa(0) == 0


def test_mamba2_130m(tmp_path):
    hp = load(tmp_path, "mamba2_130m")
    assert hp.n_embd_r(0) == (4 - 1) * (1536 + 2 * 1 * 128)
    assert hp.n_embd_s(0) == 128 * 1536


def test_jamba_v01_layer_pattern(tmp_path):
    hp = load(tmp_path, "jamba_v01")
    # attn_layer_period 8, attn_layer_offset 4: a layer is recurrent iff it has no KV heads
    assert hp.attention_layer_ids() == (4, 12, 20, 28)
    assert hp.recurrent_layer_ids() == tuple(il for il in range(32) if il % 8 != 4)
    assert hp.n_embd_head_k == 4096 // 32 and hp.n_embd_k_gqa(4) == 8 * 128
    assert hp.n_embd_k_gqa(0) == 0 and hp.n_embd_r(4) == 0 and hp.n_embd_s(4) == 0
    assert hp.n_embd_r(0) == 3 * 8192 and hp.n_embd_s(0) == 16 * 8192
    assert hp.memory_kind == "hybrid" and hp.rope() is None


def test_granite_h_tiny(tmp_path):
    hp = load(tmp_path, "granite_h_tiny")
    assert hp.attention_layer_ids() == GRANITE_H_TINY_ATTN
    assert len(hp.recurrent_layer_ids()) == 36
    assert hp.n_embd_k_gqa(5) == 4 * (1536 // 12)
    assert hp.n_embd_r(0) == 3 * (3072 + 2 * 1 * 128) and hp.n_embd_s(0) == 128 * 3072
    assert hp.memory_kind == "hybrid"
    assert hp.rope() is None  # rope.scaling.finetuned = false switches RoPE off (NoPE)


def test_nemotron_h_8b_mlp_layers_hold_nothing(tmp_path):
    hp = load(tmp_path, "nemotron_h_8b")
    pat = NEMOTRON_H_8B_PATTERN
    assert hp.recurrent_layer_ids() == tuple(i for i, c in enumerate(pat) if c == "M")
    assert hp.attention_layer_ids() == tuple(i for i, c in enumerate(pat) if c == "*")
    mlp = [i for i, c in enumerate(pat) if c == "-"]
    assert len(mlp) == 24
    assert not any(hp.is_recurrent(il) or hp.has_attention(il) for il in mlp)
    assert hp.n_embd_r(0) == 3 * (8192 + 2 * 8 * 128) and hp.n_embd_s(0) == 128 * 8192


def test_falcon_h1_every_layer_is_both(tmp_path):
    hp = load(tmp_path, "falcon_h1_05b")
    assert hp.recurrent_layer_ids() == tuple(range(36)) == hp.attention_layer_ids()
    assert hp.n_embd_head_k == 64 and hp.n_embd_k_gqa(0) == 2 * 64  # key_length wins
    assert hp.n_embd_r(0) == 3 * (1536 + 2 * 128) and hp.n_embd_s(0) == 128 * 1536
    assert hp.memory_kind == "hybrid" and hp.rope()["mode"] == "neox"


def test_qwen3next_full_attention_interval(tmp_path):
    hp = load(tmp_path, "qwen3next_80b")
    assert hp.attention_layer_ids() == tuple(range(3, 48, 4))
    assert len(hp.recurrent_layer_ids()) == 36
    assert hp.n_embd_k_gqa(3) == 2 * 256 and hp.rope(3)["n_rot"] == 64
    # gated delta net: conv over q, k, v (2 x 16 x 128 + 4096 channels); S = 128 x 4096
    assert hp.n_embd_r(0) == 3 * (4096 + 2 * 16 * 128) and hp.n_embd_s(0) == 128 * 4096
    hp2 = load(tmp_path, "qwen3next_80b", full_attention_interval=2)
    assert hp2.attention_layer_ids() == tuple(range(1, 48, 2))


def test_lfm2_350m(tmp_path):
    hp = load(tmp_path, "lfm2_350m")
    assert hp.attention_layer_ids() == LFM2_350M_ATTN
    assert hp.n_embd_r(0) == 1024 * (3 - 1) and hp.n_embd_s(0) == 0
    assert hp.memory_kind == "hybrid"
    swa = load(tmp_path, "lfm2_350m", attention__sliding_window=512)
    assert swa.memory_kind == "hybrid_iswa" and swa.n_swa == 512
    assert [il for il in range(16) if swa.is_swa_layer(il)] == list(LFM2_350M_ATTN)


def test_all_models_load(tmp_path):
    for name in MODELS:
        assert load(tmp_path, name).arch == MODELS[name]["arch"]


def test_unsupported_arch(tmp_path):
    path = write_metadata(tmp_path / "gpt2.gguf", "gpt2",
                          {"context_length": 1024, "embedding_length": 768, "block_count": 12})
    with pytest.raises(ValueError, match="unsupported model architecture 'gpt2'"):
        read_gguf_hparams(path)


@pytest.mark.parametrize("name,key", [
    ("llama32_1b", "llama.block_count"),
    ("llama32_1b", "llama.context_length"),
    ("mamba_130m", "mamba.ssm.state_size"),
    ("mamba2_130m", "mamba2.ssm.group_count"),
    ("lfm2_350m", "lfm2.shortconv.l_cache"),
    ("qwen3next_80b", "qwen3next.ssm.conv_kernel"),
])
def test_missing_required_key(tmp_path, name, key):
    with pytest.raises(ValueError, match=f"missing the required key '{key}'"):
        load(tmp_path, name, drop=(key.split(".", 1)[1],))


def test_per_layer_array_must_match_block_count(tmp_path):
    with pytest.raises(ValueError, match="head_count_kv' has 3 entries"):
        load(tmp_path, "jamba_v01", attention__head_count_kv=[8, 0, 8])


def test_per_layer_head_count_kv_on_plain_model(tmp_path):
    hp = load(tmp_path, "llama32_1b", attention__head_count_kv=[8] * 8 + [4] * 8)
    assert hp.n_embd_k_gqa(0) == 512 and hp.n_embd_k_gqa(15) == 256
    assert hp.n_embd_v_gqa_max() == 512


def test_llama_rejects_partial_rotary(tmp_path):
    with pytest.raises(ValueError, match="invalid n_rot"):
        load(tmp_path, "llama32_1b", rope__dimension_count=32)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError):
        read_gguf_hparams(bad)
    with pytest.raises(FileNotFoundError):
        read_gguf_hparams(tmp_path / "missing.gguf")


def test_direct_construction_and_validation():
    hp = ModelHParams(arch="llama", n_layer=2, n_embd=64, n_head=4, n_head_kv=(2, 1))
    assert hp.n_embd_head_k == 16 and hp.n_embd_k_gqa(1) == 16 and hp.n_rot == 16
    with pytest.raises(IndexError):
        hp.n_embd_k_gqa(2)
    with pytest.raises(ValueError, match="n_head_kv"):
        ModelHParams(arch="llama", n_layer=2, n_embd=64, n_head=4, n_head_kv=(2, 1, 1))
    with pytest.raises(ValueError, match="swa_type is NONE"):
        ModelHParams(arch="llama", n_layer=2, n_embd=64, n_head=4, swa_layers=(True, False))
    with pytest.raises(ValueError, match="n_layer"):
        ModelHParams(arch="llama", n_layer=0, n_embd=64)
    # frozen: hparams are values
    with pytest.raises(Exception):
        hp.n_layer = 3
