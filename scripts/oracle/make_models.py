"""Write tiny random-weight GGUF models that the vendored llama.cpp can load.

llmem's copy of /work/shared/oracle/make_models.py, with one more model for quantized K/V caches:
``llama_hd32`` (head size 32, so that a block of 32 values never spans two heads: llama.cpp
refuses block types whose size does not divide the head size).

Each model exercises one of llama.cpp's memory kinds:

  llama       plain KV cache (GQA: 4 query heads, 2 KV heads)
  gemma2      iSWA KV cache (layer 0 sliding window, layer 1 full attention)
  mamba       recurrent memory, conv state (r) + SSM state (s)
  mamba2      recurrent memory, Mamba-2 layout (grouped SSM)
  jamba       hybrid memory: attention layers + Mamba layers (r and s states)
  lfm2        hybrid memory: attention layers + short-conv layers (r state only, empty s)
  lfm2_swa    hybrid-iSWA memory: lfm2 with a sliding window on its attention layers

Usage: python make_models.py OUT_DIR [--only NAME ...] [--check]

Weights are f32, drawn from a fixed seed, so the files are byte-identical across runs.
The vocabulary is the "test" tokenizer (tokens tok_0 .. tok_63), which needs no merges.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import gguf

N_VOCAB = 64
N_CTX_TRAIN = 4096
SEED = 1234


class ModelWriter:
    """Collects keys and tensors for one architecture, then writes the GGUF file."""

    def __init__(self, arch: str, name: str):
        self.arch = arch
        self.name = name
        self.kv: list[tuple[str, object, gguf.GGUFValueType, gguf.GGUFValueType | None]] = []
        self.tensors: list[tuple[str, np.ndarray]] = []
        # one generator per model so adding a model never changes another one's weights
        self.rng = np.random.default_rng([SEED, sum(map(ord, name))])

    # --- metadata -----------------------------------------------------------------
    def u32(self, key: str, value: int) -> None:
        self.kv.append((key.format(arch=self.arch), int(value), gguf.GGUFValueType.UINT32, None))

    def f32(self, key: str, value: float) -> None:
        self.kv.append((key.format(arch=self.arch), float(value), gguf.GGUFValueType.FLOAT32, None))

    def u32_array(self, key: str, values: list[int]) -> None:
        self.kv.append((key.format(arch=self.arch), [int(v) for v in values],
                        gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32))

    def common(self, n_embd: int, n_layer: int, n_ff: int | list[int]) -> None:
        self.u32("{arch}.vocab_size", N_VOCAB)
        self.u32("{arch}.context_length", N_CTX_TRAIN)
        self.u32("{arch}.embedding_length", n_embd)
        self.u32("{arch}.block_count", n_layer)
        if isinstance(n_ff, list):
            self.u32_array("{arch}.feed_forward_length", n_ff)
        else:
            self.u32("{arch}.feed_forward_length", n_ff)
        self.f32("{arch}.attention.layer_norm_rms_epsilon", 1e-5)

    # --- tensors ------------------------------------------------------------------
    # shapes are given in ggml order (ne0 first), as llama.cpp's loader spells them;
    # numpy wants them reversed.
    def weight(self, name: str, ne: tuple[int, ...], std: float = 0.1) -> None:
        data = self.rng.normal(0.0, std, size=tuple(reversed(ne))).astype(np.float32)
        self.tensors.append((name, data))

    def norm(self, name: str, n: int) -> None:
        data = (1.0 + self.rng.normal(0.0, 0.05, size=(n,))).astype(np.float32)
        self.tensors.append((name, data))

    def const(self, name: str, ne: tuple[int, ...], data: np.ndarray) -> None:
        self.tensors.append((name, np.ascontiguousarray(data.reshape(tuple(reversed(ne))), dtype=np.float32)))

    def write(self, out_dir: Path) -> Path:
        path = out_dir / f"{self.name}.gguf"
        w = gguf.GGUFWriter(str(path), self.arch)
        w.add_name(f"oracle-{self.name}")
        for key, value, vtype, sub in self.kv:
            w.add_key_value(key, value, vtype, sub)
        w.add_tokenizer_model("test")
        w.add_token_list([f"tok_{i}" for i in range(N_VOCAB)])
        w.add_token_scores([0.0] * N_VOCAB)
        w.add_token_types([int(gguf.TokenType.NORMAL)] * N_VOCAB)
        for name, data in self.tensors:
            w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path


def attention_block(m: ModelWriter, il: int, n_embd: int, n_head: int, n_head_kv: int) -> None:
    head_dim = n_embd // n_head
    m.weight(f"blk.{il}.attn_q.weight", (n_embd, n_head * head_dim))
    m.weight(f"blk.{il}.attn_k.weight", (n_embd, n_head_kv * head_dim))
    m.weight(f"blk.{il}.attn_v.weight", (n_embd, n_head_kv * head_dim))
    m.weight(f"blk.{il}.attn_output.weight", (n_head * head_dim, n_embd))


def swiglu_ffn(m: ModelWriter, il: int, n_embd: int, n_ff: int) -> None:
    m.weight(f"blk.{il}.ffn_gate.weight", (n_embd, n_ff))
    m.weight(f"blk.{il}.ffn_up.weight", (n_embd, n_ff))
    m.weight(f"blk.{il}.ffn_down.weight", (n_ff, n_embd))


def mamba1_block(m: ModelWriter, il: int, n_embd: int, d_inner: int, d_state: int, d_conv: int,
                 dt_rank: int, jamba_norms: bool) -> None:
    m.weight(f"blk.{il}.ssm_in.weight", (n_embd, 2 * d_inner))
    m.weight(f"blk.{il}.ssm_conv1d.weight", (d_conv, d_inner), std=0.3)
    m.weight(f"blk.{il}.ssm_conv1d.bias", (d_inner,), std=0.05)
    m.weight(f"blk.{il}.ssm_x.weight", (d_inner, dt_rank + 2 * d_state))
    m.weight(f"blk.{il}.ssm_dt.weight", (dt_rank, d_inner))
    m.weight(f"blk.{il}.ssm_dt.bias", (d_inner,), std=0.05)
    # A must be negative so that the state decays (A = -exp(A_log))
    a = -np.exp(m.rng.normal(0.0, 0.5, size=(d_inner, d_state)))
    m.const(f"blk.{il}.ssm_a", (d_state, d_inner), a)
    m.const(f"blk.{il}.ssm_d", (d_inner,), 1.0 + m.rng.normal(0.0, 0.05, size=(d_inner,)))
    m.weight(f"blk.{il}.ssm_out.weight", (d_inner, n_embd))
    if jamba_norms:
        m.norm(f"blk.{il}.ssm_dt_norm.weight", dt_rank)
        m.norm(f"blk.{il}.ssm_b_norm.weight", d_state)
        m.norm(f"blk.{il}.ssm_c_norm.weight", d_state)


def make_llama(out: Path) -> Path:
    return _make_llama(out, "llama", 64)


def make_llama_hd32(out: Path) -> Path:
    return _make_llama(out, "llama_hd32", 128)


def _make_llama(out: Path, name: str, n_embd: int) -> Path:
    n_head, n_head_kv, n_ff, n_layer = 4, 2, 128, 2
    m = ModelWriter("llama", name)
    m.common(n_embd, n_layer, n_ff)
    m.u32("{arch}.attention.head_count", n_head)
    m.u32("{arch}.attention.head_count_kv", n_head_kv)
    m.u32("{arch}.rope.dimension_count", n_embd // n_head)
    m.f32("{arch}.rope.freq_base", 10000.0)
    m.weight("token_embd.weight", (n_embd, N_VOCAB), std=1.0)
    m.norm("output_norm.weight", n_embd)
    m.weight("output.weight", (n_embd, N_VOCAB))
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", n_embd)
        attention_block(m, il, n_embd, n_head, n_head_kv)
        m.norm(f"blk.{il}.ffn_norm.weight", n_embd)
        swiglu_ffn(m, il, n_embd, n_ff)
    return m.write(out)


GEMMA2_WINDOW = 16


def make_gemma2(out: Path) -> Path:
    # sliding_window_pattern 2: layer 0 is SWA, layer 1 is full attention
    n_embd, n_head, n_head_kv, n_ff, n_layer = 64, 4, 2, 128, 2
    m = ModelWriter("gemma2", "gemma2")
    m.common(n_embd, n_layer, n_ff)
    m.u32("{arch}.attention.head_count", n_head)
    m.u32("{arch}.attention.head_count_kv", n_head_kv)
    m.u32("{arch}.attention.sliding_window", GEMMA2_WINDOW)
    m.u32("{arch}.attention.sliding_window_pattern", 2)
    m.f32("{arch}.attn_logit_softcapping", 50.0)
    m.f32("{arch}.final_logit_softcapping", 30.0)
    m.weight("token_embd.weight", (n_embd, N_VOCAB), std=0.2)
    m.norm("output_norm.weight", n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", n_embd)
        attention_block(m, il, n_embd, n_head, n_head_kv)
        m.norm(f"blk.{il}.post_attention_norm.weight", n_embd)
        m.norm(f"blk.{il}.ffn_norm.weight", n_embd)
        swiglu_ffn(m, il, n_embd, n_ff)
        m.norm(f"blk.{il}.post_ffw_norm.weight", n_embd)
    return m.write(out)


def make_mamba(out: Path) -> Path:
    n_embd, n_layer, d_state, d_conv, dt_rank = 32, 2, 16, 4, 4
    d_inner = 2 * n_embd
    m = ModelWriter("mamba", "mamba")
    m.common(n_embd, n_layer, 0)
    m.u32("{arch}.ssm.conv_kernel", d_conv)
    m.u32("{arch}.ssm.inner_size", d_inner)
    m.u32("{arch}.ssm.state_size", d_state)
    m.u32("{arch}.ssm.time_step_rank", dt_rank)
    m.weight("token_embd.weight", (n_embd, N_VOCAB), std=1.0)
    m.norm("output_norm.weight", n_embd)
    m.weight("output.weight", (n_embd, N_VOCAB))
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", n_embd)
        mamba1_block(m, il, n_embd, d_inner, d_state, d_conv, dt_rank, jamba_norms=False)
    return m.write(out)


def make_mamba2(out: Path) -> Path:
    n_embd, n_layer, d_state, d_conv, n_head, n_group = 32, 2, 16, 4, 4, 2
    d_inner = 2 * n_embd
    conv_dim = d_inner + 2 * n_group * d_state
    d_in_proj = d_inner + conv_dim + n_head
    m = ModelWriter("mamba2", "mamba2")
    m.common(n_embd, n_layer, 0)
    m.u32("{arch}.ssm.conv_kernel", d_conv)
    m.u32("{arch}.ssm.inner_size", d_inner)
    m.u32("{arch}.ssm.state_size", d_state)
    m.u32("{arch}.ssm.time_step_rank", n_head)
    m.u32("{arch}.ssm.group_count", n_group)
    m.weight("token_embd.weight", (n_embd, N_VOCAB), std=1.0)
    m.norm("output_norm.weight", n_embd)
    m.weight("output.weight", (n_embd, N_VOCAB))
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", n_embd)
        m.weight(f"blk.{il}.ssm_in.weight", (n_embd, d_in_proj))
        m.weight(f"blk.{il}.ssm_conv1d.weight", (d_conv, conv_dim), std=0.3)
        m.weight(f"blk.{il}.ssm_conv1d.bias", (conv_dim,), std=0.05)
        m.weight(f"blk.{il}.ssm_dt.bias", (n_head,), std=0.05)
        m.const(f"blk.{il}.ssm_a", (1, n_head), -np.exp(m.rng.normal(0.0, 0.5, size=(n_head,))))
        m.const(f"blk.{il}.ssm_d", (1, n_head), 1.0 + m.rng.normal(0.0, 0.05, size=(n_head,)))
        m.const(f"blk.{il}.ssm_norm.weight", (d_inner // n_group, n_group),
                1.0 + m.rng.normal(0.0, 0.05, size=(d_inner,)))
        m.weight(f"blk.{il}.ssm_out.weight", (d_inner, n_embd))
    return m.write(out)


JAMBA_LAYERS = ["attn", "mamba", "attn", "mamba"]


def make_jamba(out: Path) -> Path:
    n_embd, n_head, n_head_kv, n_ff = 32, 4, 2, 64
    d_state, d_conv, dt_rank = 16, 4, 4
    d_inner = 2 * n_embd
    n_layer = len(JAMBA_LAYERS)
    m = ModelWriter("jamba", "jamba")
    m.common(n_embd, n_layer, n_ff)
    # a layer with zero KV heads is a Mamba layer
    m.u32_array("{arch}.attention.head_count", [n_head if k == "attn" else 0 for k in JAMBA_LAYERS])
    m.u32_array("{arch}.attention.head_count_kv", [n_head_kv if k == "attn" else 0 for k in JAMBA_LAYERS])
    m.u32("{arch}.ssm.conv_kernel", d_conv)
    m.u32("{arch}.ssm.inner_size", d_inner)
    m.u32("{arch}.ssm.state_size", d_state)
    m.u32("{arch}.ssm.time_step_rank", dt_rank)
    m.weight("token_embd.weight", (n_embd, N_VOCAB), std=1.0)
    m.norm("output_norm.weight", n_embd)
    m.weight("output.weight", (n_embd, N_VOCAB))
    for il, kind in enumerate(JAMBA_LAYERS):
        m.norm(f"blk.{il}.attn_norm.weight", n_embd)
        if kind == "attn":
            attention_block(m, il, n_embd, n_head, n_head_kv)
        else:
            mamba1_block(m, il, n_embd, d_inner, d_state, d_conv, dt_rank, jamba_norms=True)
        m.norm(f"blk.{il}.ffn_norm.weight", n_embd)
        swiglu_ffn(m, il, n_embd, n_ff)
    return m.write(out)


LFM2_LAYERS = ["attn", "conv", "attn", "conv"]
LFM2_WINDOW = 16


def _make_lfm2(out: Path, name: str, window: int | None) -> Path:
    n_embd, n_head, n_head_kv, n_ff, l_cache = 32, 4, 2, 64, 3
    head_dim = n_embd // n_head
    n_layer = len(LFM2_LAYERS)
    m = ModelWriter("lfm2", name)
    m.common(n_embd, n_layer, n_ff)
    m.u32_array("{arch}.attention.head_count", [n_head if k == "attn" else 0 for k in LFM2_LAYERS])
    m.u32_array("{arch}.attention.head_count_kv", [n_head_kv if k == "attn" else 0 for k in LFM2_LAYERS])
    m.u32("{arch}.shortconv.l_cache", l_cache)
    if window is not None:
        m.u32("{arch}.attention.sliding_window", window)
    m.weight("token_embd.weight", (n_embd, N_VOCAB), std=1.0)
    m.norm("token_embd_norm.weight", n_embd)  # lfm2's output norm carries this name
    for il, kind in enumerate(LFM2_LAYERS):
        m.norm(f"blk.{il}.attn_norm.weight", n_embd)
        m.norm(f"blk.{il}.ffn_norm.weight", n_embd)
        swiglu_ffn(m, il, n_embd, n_ff)
        if kind == "attn":
            m.norm(f"blk.{il}.attn_q_norm.weight", head_dim)
            m.norm(f"blk.{il}.attn_k_norm.weight", head_dim)
            attention_block(m, il, n_embd, n_head, n_head_kv)
        else:
            m.weight(f"blk.{il}.shortconv.conv.weight", (l_cache, n_embd), std=0.3)
            m.weight(f"blk.{il}.shortconv.in_proj.weight", (n_embd, 3 * n_embd))
            m.weight(f"blk.{il}.shortconv.out_proj.weight", (n_embd, n_embd))
    return m.write(out)


def make_lfm2(out: Path) -> Path:
    return _make_lfm2(out, "lfm2", None)


def make_lfm2_swa(out: Path) -> Path:
    return _make_lfm2(out, "lfm2_swa", LFM2_WINDOW)


MODELS: dict[str, Callable[[Path], Path]] = {
    "llama": make_llama,
    "llama_hd32": make_llama_hd32,
    "gemma2": make_gemma2,
    "mamba": make_mamba,
    "mamba2": make_mamba2,
    "jamba": make_jamba,
    "lfm2": make_lfm2,
    "lfm2_swa": make_lfm2_swa,
}


def check_model(path: Path) -> str:
    """Load the model with llama.cpp and decode a few tokens; return a one-line summary."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import oracle  # noqa: E402  (local module)

    scenario = {
        "model": path.stem,
        "context": {"n_ctx": 256, "n_seq_max": 2},
        "steps": [
            {"op": "decode", "tokens": [1, 2, 3, 4], "pos": [0, 1, 2, 3], "seq_ids": [[0]] * 4,
             "logits": [0, 0, 0, 1]},
            {"op": "logits", "i": 3},
            {"op": "decode", "tokens": [5], "pos": [4], "seq_ids": [[0]], "logits": [1]},
            {"op": "pos", "seqs": [0, 1]},
        ],
    }
    result = oracle.run_scenario(scenario, models_dir=path.parent)
    obs = result["observations"]
    # a recurrent state is one cell at the last position, so its seq_pos_min is 4 as well
    kind = result["info"]["memory"]
    want_min = 4 if kind in ("recurrent", "hybrid", "hybrid_iswa") else 0
    ok = obs[0]["ret"] == 0 and obs[2]["ret"] == 0 and obs[3]["min"][0] == want_min and obs[3]["max"][0] == 4
    finite = all(np.isfinite(obs[1]["logits"]))
    return (f"{path.name}: {'OK' if ok and finite else 'FAILED'} memory={result['info']['memory']} "
            f"logits[:4]={obs[1]['logits'][:4]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--only", nargs="*", choices=sorted(MODELS), help="write only these models")
    ap.add_argument("--check", action="store_true", help="load each model with llama.cpp and decode a few tokens")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    names = args.only or list(MODELS)
    failed = False
    for name in names:
        path = MODELS[name](args.out_dir)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
        if args.check:
            line = check_model(path)
            print("  " + line)
            failed |= "FAILED" in line
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
