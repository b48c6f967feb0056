"""K/V on the GPU (torch storage): llmem's memory work of a decode step against HF transformers'
cache updates for the same shapes, and the K-shift against device-to-device copy bandwidth.

Run on a machine with CUDA, torch and transformers: ``python -m bench --only gpu``. Elsewhere
it says why it skips. Times are wall-clock per decode step with the device synchronised once per
round of steps (so the host planning, the index upload and the row stores all count, and GPU
work overlaps host work as it would in a server); the contenders are interleaved round by round
in one process."""

from __future__ import annotations

import inspect
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

import llmem

N_LAYER = 8            # layers of K/V touched per step (a slice of an 8B model's 32)
N_KV_HEAD, HEAD_DIM = 8, 128
CTX = 512              # cells per sequence
PREFILL = 128          # tokens each sequence holds before the timed steps


def skip_reason() -> Optional[str]:
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install llmem[torch])"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _sync() -> None:
    import torch
    torch.cuda.synchronize()


def _hf_static(n_seqs: int, dtype: Any, device: str) -> tuple[Optional[Callable[[int], None]], str]:
    """A step of StaticCache updates (every layer's K and V at one position), or (None, why)."""
    import torch
    try:
        import transformers
        from transformers import LlamaConfig, StaticCache
    except Exception as exc:  # noqa: BLE001 - any import failure means "no baseline"
        return None, f"transformers unavailable: {exc}"
    cfg = LlamaConfig(num_hidden_layers=N_LAYER, num_attention_heads=N_KV_HEAD * 4, num_key_value_heads=N_KV_HEAD,
                      hidden_size=N_KV_HEAD * 4 * HEAD_DIM, head_dim=HEAD_DIM, max_position_embeddings=CTX)
    params = inspect.signature(StaticCache.__init__).parameters
    kw: Dict[str, Any] = {"config": cfg, "max_cache_len": CTX}
    if "max_batch_size" in params:
        kw["max_batch_size"] = n_seqs
    if "device" in params:
        kw["device"] = device
    if "dtype" in params:
        kw["dtype"] = dtype
    try:
        cache = StaticCache(**kw)
    except Exception as exc:  # noqa: BLE001
        return None, f"StaticCache({', '.join(kw)}) failed on transformers {transformers.__version__}: {exc}"
    k = torch.randn(n_seqs, N_KV_HEAD, 1, HEAD_DIM, dtype=dtype, device=device)
    pos = [torch.tensor([PREFILL + i], device=device) for i in range(CTX - PREFILL)]

    def step(i: int) -> None:
        cp = pos[i % len(pos)]
        for il in range(N_LAYER):
            cache.update(k, k, il, {"cache_position": cp})
    step(0)
    return step, f"transformers {transformers.__version__}"


def _hf_dynamic(n_seqs: int, dtype: Any, device: str) -> tuple[Optional[Callable[[int], None]], str]:
    import torch
    try:
        from transformers import DynamicCache
    except Exception as exc:  # noqa: BLE001
        return None, f"transformers unavailable: {exc}"
    k0 = torch.randn(n_seqs, N_KV_HEAD, PREFILL, HEAD_DIM, dtype=dtype, device=device)
    k = torch.randn(n_seqs, N_KV_HEAD, 1, HEAD_DIM, dtype=dtype, device=device)
    state: Dict[str, Any] = {}

    def reset() -> None:
        c = DynamicCache()
        for il in range(N_LAYER):
            c.update(k0, k0, il)
        state["c"] = c

    reset()

    def step(i: int) -> None:
        if i % 64 == 0:  # bounded growth: the cache is rebuilt outside the timed rounds' average
            reset()
        for il in range(N_LAYER):
            state["c"].update(k, k, il)
    return step, "DynamicCache (torch.cat per layer per step)"


def _llmem_step(n_seqs: int, dtype: Any, device: str) -> tuple[Callable[[int], None], Any]:
    import torch
    kv = llmem.KVCache(N_LAYER, N_KV_HEAD * HEAD_DIM, N_KV_HEAD * HEAD_DIM, n_seqs * CTX, n_seq_max=n_seqs,
                       dtype_k=dtype, dtype_v=dtype, v_trans=False, storage="torch", device=device,
                       rope=llmem.Rope(n_rot=HEAD_DIM, mode="neox"))
    ids = np.arange(n_seqs, dtype=np.int32)
    for _ in range(PREFILL):
        kv.decode_step(ids)
    rows = torch.randn(n_seqs, N_KV_HEAD * HEAD_DIM, dtype=dtype, device=device)
    state = {"n": PREFILL}

    def step(i: int) -> None:
        if state["n"] >= CTX - 1:  # keep the sequences within their cells
            for s in range(n_seqs):
                kv.seq_rm(s, PREFILL, -1)
            state["n"] = PREFILL
        ctx = kv.decode_step(ids)
        ctx.k_idxs(device=device)
        for il in range(N_LAYER):
            ctx.cpy_k(il, rows)
            ctx.cpy_v(il, rows)
        state["n"] += 1
    return step, kv


def _time_rounds(contenders: Dict[str, Callable[[int], None]], rounds: int, steps: int) -> Dict[str, List[float]]:
    out: Dict[str, List[float]] = {name: [] for name in contenders}
    i = 0
    for _ in range(rounds):
        for name, step in contenders.items():  # interleaved: each round runs every contender
            _sync()
            t0 = time.perf_counter()
            for j in range(steps):
                step(i + j)
            _sync()
            out[name].append((time.perf_counter() - t0) / steps * 1e6)
        i += steps
    return out


def _device_copy_us(dst: Any, src: Any) -> float:
    """Microseconds of one device-to-device copy of src into dst, timed with CUDA events."""
    import torch
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    dst.copy_(src)
    ev1.record()
    _sync()
    return float(ev0.elapsed_time(ev1)) * 1e3


def _kshift_vs_copy(dtype: Any, device: str, n_cells: int) -> Dict[str, float]:
    import torch
    kv = llmem.KVCache(N_LAYER, N_KV_HEAD * HEAD_DIM, N_KV_HEAD * HEAD_DIM, n_cells, dtype_k=dtype, dtype_v=dtype,
                       v_trans=False, storage="torch", device=device, rope=llmem.Rope(n_rot=HEAD_DIM, mode="neox"))
    kv.init_batch(llmem.Batch(token=np.zeros(n_cells, np.int32), pos=np.arange(n_cells, dtype=np.int32),
                              seq_id=np.zeros(n_cells, np.int32)), n_cells).apply()
    k_bytes = sum(kv.k(il).numel() * kv.k(il).element_size() for il in kv.layers)
    src = torch.empty(k_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    shift_us, copy_us = [], []
    for r in range(5):
        kv.seq_add(0, 0, -1, 1 if r % 2 == 0 else -1)
        _sync()
        t0 = time.perf_counter()
        kv.init_update().apply()
        _sync()
        shift_us.append((time.perf_counter() - t0) * 1e6)
        copy_us.append(_device_copy_us(dst, src))
    s, c = statistics.median(shift_us[1:]), statistics.median(copy_us[1:])
    return {"cells": n_cells, "k_bytes": k_bytes, "kshift_us": s, "copy_us": c,
            "kshift_gbs": 2 * k_bytes / s / 1e3, "copy_gbs": 2 * k_bytes / c / 1e3}


def _recurrent_vs_copy(dtype: Any, device: str, n_seqs: int, n_layer: int = 4) -> Dict[str, float]:
    """A decode step's recurrent state work (every layer's s gathered through s_copy and stored
    back, r likewise) with torch storage, against device-to-device copies of the same bytes."""
    import torch
    n_embd_r, n_embd_s = 3 * 8192, 128 * 64 * 16  # Mamba-2-like: conv window, heads x head_dim x d_state
    mem = llmem.RecurrentMemory(n_layer, n_embd_r, n_embd_s, mem_size=n_seqs, n_seq_max=n_seqs, dtype_r=dtype,
                                dtype_s=dtype, storage="torch", device=device)
    ids = np.arange(n_seqs, dtype=np.int32)
    pos = [0]

    def step() -> None:
        ctx = mem.init_batch(llmem.Batch(token=np.zeros(n_seqs, np.int32), pos=np.full(n_seqs, pos[0], np.int32),
                                         seq_id=ids), n_seqs)
        for _ in ctx:
            for il in range(n_layer):
                ctx.store_r(il, ctx.get_r(il))
                ctx.store_s(il, ctx.get_s(il))
        pos[0] += 1
    step()
    row_bytes = (n_embd_r + n_embd_s) * torch.tensor([], dtype=dtype).element_size()
    moved = n_layer * n_seqs * row_bytes  # gathered once, stored once: read + write each
    src = torch.empty(moved, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    rs_us, copy_us = [], []
    for _ in range(6):
        _sync()
        t0 = time.perf_counter()
        step()
        _sync()
        rs_us.append((time.perf_counter() - t0) * 1e6)
        copy_us.append(_device_copy_us(dst, src))
    r, c = statistics.median(rs_us[1:]), statistics.median(copy_us[1:])
    return {"seqs": n_seqs, "bytes": moved, "rs_us": r, "copy_us": c, "rs_gbs": 4 * moved / r / 1e3,
            "copy_gbs": 2 * moved / c / 1e3}


def run(quick: bool = True) -> int:
    why = skip_reason()
    if why:
        print(f"GPU bench skipped: {why}")
        return 0
    import torch
    device = "cuda"
    dtype = torch.bfloat16
    print(f"GPU bench: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, llmem {llmem.__version__}; "
          f"{N_LAYER} layers x K and V of {N_KV_HEAD}x{HEAD_DIM} bf16, {CTX} cells per sequence, "
          f"{PREFILL} tokens held before the timed steps")
    rounds, steps = (5, 20) if quick else (10, 50)
    print("\ndecode step, memory work only (us per step, median of rounds; wall clock, GPU synchronised per round)")
    print(f"{'sequences':>9} | {'llmem plan+apply+idx+cpy':>24} | {'llmem plan+apply':>16} | "
          f"{'HF StaticCache.update':>21} | {'HF DynamicCache.update':>22}")
    for n_seqs in (64, 256):
        step, kv = _llmem_step(n_seqs, dtype, device)
        ids = np.arange(n_seqs, dtype=np.int32)
        contenders: Dict[str, Callable[[int], None]] = {"llmem": step}

        def plan_only(i: int, kv: Any = kv, ids: Any = ids) -> None:
            kv.decode_step(ids)
            if kv.seq_pos_max(0) >= CTX - 2:
                for s in range(n_seqs):
                    kv.seq_rm(s, PREFILL, -1)
        notes = []
        st, note = _hf_static(n_seqs, dtype, device)
        if st:
            contenders["static"] = st
        notes.append(note)
        dy, note = _hf_dynamic(n_seqs, dtype, device)
        if dy:
            contenders["dynamic"] = dy
        contenders["plan"] = plan_only
        res = _time_rounds(contenders, rounds, steps)
        med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in res.items()}
        fmt = lambda k: f"{med[k]:.0f}" if k in med else "n/a"  # noqa: E731
        print(f"{n_seqs:>9} | {fmt('llmem'):>24} | {fmt('plan'):>16} | {fmt('static'):>21} | {fmt('dynamic'):>22}")
        print(f"{'':>9}   baselines: {'; '.join(notes)}")
        del kv, contenders
        torch.cuda.empty_cache()
    print("\nK-shift of every cell (all layers' K rows re-rotated, RoPE NeoX in f32) vs a device-to-device copy of "
          "the same bytes")
    print(f"{'cells':>7} | {'K bytes':>9} | {'K-shift us':>10} | {'GB/s (r+w)':>10} | {'copy us':>8} | {'GB/s (r+w)':>10}")
    for n in (4096, 65536):
        r = _kshift_vs_copy(dtype, device, n)
        print(f"{r['cells']:>7} | {r['k_bytes'] / 2**20:>7.0f}Mi | {r['kshift_us']:>10.0f} | {r['kshift_gbs']:>10.1f} | "
              f"{r['copy_us']:>8.0f} | {r['copy_gbs']:>10.1f}")
    print("\nrecurrent decode step: r and s of every layer gathered (s_copy) and stored back, torch storage, vs a "
          "device-to-device copy of the rows once")
    print(f"{'seqs':>5} | {'state bytes':>11} | {'gather+store us':>15} | {'GB/s (2r+2w)':>12} | {'copy us':>8} | "
          f"{'GB/s (r+w)':>10}")
    for n in (64, 256):
        r = _recurrent_vs_copy(torch.float32, device, n)
        print(f"{r['seqs']:>5} | {r['bytes'] / 2**20:>9.0f}Mi | {r['rs_us']:>15.0f} | {r['rs_gbs']:>12.1f} | "
              f"{r['copy_us']:>8.0f} | {r['copy_gbs']:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(run(quick="--full" not in sys.argv))
