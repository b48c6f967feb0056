"""Metadata-only GGUF files with the published hyper-parameters of real models.

Each ``MODELS`` entry lists the GGUF keys llama.cpp's converter writes for that model (only the
ones that matter for memory, plus a few common ones), with the values of the model's Hugging
Face config. ``write_gguf(tmp_path, name)`` writes it (no tensors) and returns the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import gguf


def _per_layer(n: int, pick) -> list:
    return [int(pick(il)) for il in range(n)]


# Nemotron-H-8B-Base-8K: M = Mamba-2, * = attention, - = MLP only
NEMOTRON_H_8B_PATTERN = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
# ibm-granite/granite-4.0-h-tiny: attention at layers 5, 15, 25, 35 of 40, Mamba-2 elsewhere
GRANITE_H_TINY_ATTN = (5, 15, 25, 35)
# LiquidAI/LFM2-350M: full attention at these layers, short convolutions elsewhere
LFM2_350M_ATTN = (2, 5, 8, 10, 12, 14)

MODELS: Dict[str, Dict[str, Any]] = {
    # meta-llama/Llama-3.2-1B
    "llama32_1b": {"arch": "llama", "kv": {
        "context_length": 131072, "embedding_length": 2048, "block_count": 16,
        "feed_forward_length": 8192, "attention.head_count": 32, "attention.head_count_kv": 8,
        "rope.dimension_count": 64, "rope.freq_base": 500000.0,
        "attention.layer_norm_rms_epsilon": 1e-5}},
    # google/gemma-3-1b-pt: 5 sliding (window 512) + 1 global, head_dim 256, 1 KV head
    "gemma3_1b": {"arch": "gemma3", "kv": {
        "context_length": 32768, "embedding_length": 1152, "block_count": 26,
        "feed_forward_length": 6912, "attention.head_count": 4, "attention.head_count_kv": 1,
        "attention.key_length": 256, "attention.value_length": 256,
        "attention.sliding_window": 512, "rope.freq_base": 1000000.0,
        "attention.layer_norm_rms_epsilon": 1e-6}},
    # google/gemma-2-2b: alternating sliding (4096) / global layers
    "gemma2_2b": {"arch": "gemma2", "kv": {
        "context_length": 8192, "embedding_length": 2304, "block_count": 26,
        "feed_forward_length": 9216, "attention.head_count": 8, "attention.head_count_kv": 4,
        "attention.key_length": 256, "attention.value_length": 256,
        "attention.sliding_window": 4096, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "attention.layer_norm_rms_epsilon": 1e-6}},
    # state-spaces/mamba-130m: d_inner = 2 * 768, dt_rank = ceil(768 / 16)
    "mamba_130m": {"arch": "mamba", "kv": {
        "context_length": 1048576, "embedding_length": 768, "block_count": 24,
        "feed_forward_length": 0, "attention.head_count": 0, "ssm.conv_kernel": 4,
        "ssm.inner_size": 1536, "ssm.state_size": 16, "ssm.time_step_rank": 48,
        "attention.layer_norm_rms_epsilon": 1e-5}},
    # state-spaces/mamba2-130m: 24 heads of 64, one group, d_state 128
    "mamba2_130m": {"arch": "mamba2", "kv": {
        "context_length": 1048576, "embedding_length": 768, "block_count": 24,
        "feed_forward_length": 0, "attention.head_count": 0, "ssm.conv_kernel": 4,
        "ssm.inner_size": 1536, "ssm.state_size": 128, "ssm.time_step_rank": 24,
        "ssm.group_count": 1, "attention.layer_norm_rms_epsilon": 1e-5}},
    # ai21labs/Jamba-v0.1: attention every 8 layers from offset 4, Mamba elsewhere
    "jamba_v01": {"arch": "jamba", "kv": {
        "context_length": 262144, "embedding_length": 4096, "block_count": 32,
        "feed_forward_length": 14336, "attention.head_count": 32,
        "attention.head_count_kv": _per_layer(32, lambda il: 8 if il % 8 == 4 else 0),
        "ssm.conv_kernel": 4, "ssm.inner_size": 8192, "ssm.state_size": 16,
        "ssm.time_step_rank": 256, "expert_count": 16, "expert_used_count": 2,
        "attention.layer_norm_rms_epsilon": 1e-6}},
    # ibm-granite/granite-4.0-h-tiny: NoPE, Mamba-2 with 48 heads of 64 (d_inner 3072)
    "granite_h_tiny": {"arch": "granitehybrid", "kv": {
        "context_length": 131072, "embedding_length": 1536, "block_count": 40,
        "feed_forward_length": 512, "attention.head_count": 12,
        "attention.head_count_kv": _per_layer(40, lambda il: 4 if il in GRANITE_H_TINY_ATTN
                                              else 0),
        "ssm.conv_kernel": 4, "ssm.inner_size": 3072, "ssm.state_size": 128,
        "ssm.time_step_rank": 48, "ssm.group_count": 1, "rope.freq_base": 10000.0,
        "rope.scaling.finetuned": False, "expert_count": 64, "expert_used_count": 6,
        "attention.layer_norm_rms_epsilon": 1e-5}},
    # nvidia/Nemotron-H-8B-Base-8K: 24 Mamba-2, 4 attention, 24 MLP-only layers
    "nemotron_h_8b": {"arch": "nemotron_h", "kv": {
        "context_length": 8192, "embedding_length": 4096, "block_count": 52,
        "feed_forward_length": _per_layer(52, lambda il: 21504 if NEMOTRON_H_8B_PATTERN[il] == "-"
                                          else 0),
        "attention.head_count": 32,
        "attention.head_count_kv": _per_layer(52, lambda il: 8 if NEMOTRON_H_8B_PATTERN[il] == "*"
                                              else 0),
        "attention.key_length": 128, "attention.value_length": 128,
        "ssm.conv_kernel": 4, "ssm.inner_size": 8192, "ssm.state_size": 128,
        "ssm.time_step_rank": 128, "ssm.group_count": 8,
        "attention.layer_norm_rms_epsilon": 1e-5}},
    # tiiuae/Falcon-H1-0.5B-Base: attention and Mamba-2 in parallel in every layer
    "falcon_h1_05b": {"arch": "falcon-h1", "kv": {
        "context_length": 16384, "embedding_length": 1024, "block_count": 36,
        "feed_forward_length": 2048, "attention.head_count": 8, "attention.head_count_kv": 2,
        "attention.key_length": 64, "attention.value_length": 64,
        "rope.freq_base": 1e11, "ssm.conv_kernel": 4, "ssm.inner_size": 1536,
        "ssm.state_size": 128, "ssm.time_step_rank": 24, "ssm.group_count": 1,
        "attention.layer_norm_rms_epsilon": 1e-5}},
    # Qwen/Qwen3-Next-80B-A3B-Instruct: gated delta net (16 K heads, 32 V heads of 128)
    # with full attention every 4th layer
    "qwen3next_80b": {"arch": "qwen3next", "kv": {
        "context_length": 262144, "embedding_length": 2048, "block_count": 48,
        "feed_forward_length": 5120, "attention.head_count": 16, "attention.head_count_kv": 2,
        "attention.key_length": 256, "attention.value_length": 256,
        "rope.dimension_count": 64, "rope.freq_base": 10000000.0,
        "ssm.conv_kernel": 4, "ssm.inner_size": 4096, "ssm.state_size": 128,
        "ssm.time_step_rank": 32, "ssm.group_count": 16, "expert_count": 512,
        "expert_used_count": 10, "attention.layer_norm_rms_epsilon": 1e-6}},
    # LiquidAI/LFM2-350M: 10 short-conv layers (L_cache 3) and 6 attention layers
    "lfm2_350m": {"arch": "lfm2", "kv": {
        "context_length": 128000, "embedding_length": 1024, "block_count": 16,
        "feed_forward_length": 4608, "attention.head_count": 16,
        "attention.head_count_kv": _per_layer(16, lambda il: 8 if il in LFM2_350M_ATTN else 0),
        "shortconv.l_cache": 3, "rope.freq_base": 1000000.0,
        "attention.layer_norm_rms_epsilon": 1e-5}},
}


def write_metadata(path: Path, arch: str, kv: Dict[str, Any], prefix: bool = True) -> Path:
    """Write a GGUF file with only ``kv`` (keys prefixed with ``arch.`` unless ``prefix`` is
    False) and ``general.architecture``."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(path.stem)
    for key, value in kv.items():
        full = f"{arch}.{key}" if prefix else key
        if isinstance(value, bool):
            w.add_bool(full, value)
        elif isinstance(value, int):
            w.add_uint32(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        elif isinstance(value, str):
            w.add_string(full, value)
        elif isinstance(value, list):
            w.add_array(full, value)
        else:  # pragma: no cover - helper misuse
            raise TypeError(f"{key}: unsupported value {value!r}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_gguf(tmp_path: Path, name: str, drop=(), **overrides: Any) -> Path:
    """Write model ``name`` of ``MODELS`` into ``tmp_path``; ``drop`` removes keys and
    ``overrides`` (``key__with__dots`` spelled with double underscores) changes values."""
    spec = MODELS[name]
    kv = {k: v for k, v in spec["kv"].items() if k not in drop}
    for key, value in overrides.items():
        kv[key.replace("__", ".")] = value
    return write_metadata(tmp_path / f"{name}.gguf", spec["arch"], kv)
