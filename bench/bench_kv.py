"""KV cache benchmarks: the memory part of a decode step, sequence operations, K-shift and
cpy_k/cpy_v throughput, with the pure-Python reference of the tests as a baseline.

    python bench/bench_kv.py            # full run (a few minutes)
    python bench/bench_kv.py --quick    # under a minute

Targets (issue 4; llama.cpp is measured beside llmem by ``python -m bench``, not here):
  decode step, 64 seqs, 64k cells half full      <= 15 us
  decode step, 256 seqs, 1M cells half full      <= 20 us
  seq_rm of a one-token tail, any size           <= 2 us
  seq_keep                                        proportional to cells touched
Figures are medians of per-call wall time measured with perf_counter_ns from Python.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

import llmem
from llmem import Batch, KVCache, Rope

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
from reference.ref_kv import RefKV  # noqa: E402


def median_us(samples_ns):
    return statistics.median(samples_ns) / 1e3


def filled_cache(n_cells: int, n_seqs: int, fill: float = 0.5, n_layer: int = 0) -> KVCache:
    """A unified cache with n_seqs sequences holding fill * n_cells cells in total."""
    kv = KVCache(n_layer, 8, 8, n_cells, n_seq_max=n_seqs)
    per_seq = int(n_cells * fill) // n_seqs
    for s in range(n_seqs):
        batch = Batch(token=np.zeros(per_seq, np.int32), seq_id=np.full(per_seq, s, np.int32),
                      output=np.zeros(per_seq, bool))
        ctx = kv.init_batch(batch, 1 << 20)
        assert ctx.status == llmem.Status.SUCCESS
        for _ in ctx:
            pass
    return kv


def decode_steps(kv: KVCache, n_seqs: int, n_steps: int):
    """Time Batch construction + init_batch + apply of one token per sequence; every 50 steps
    the new tokens are removed again (untimed) so the cache stays half full."""
    tokens = np.zeros(n_seqs, np.int32)
    seq_ids = np.arange(n_seqs, dtype=np.int32)
    samples = []
    done = 0
    while done < n_steps:
        burst = min(50, n_steps - done)
        start = [kv.seq_pos_max(s) + 1 for s in range(n_seqs)]
        for _ in range(burst):
            t0 = time.perf_counter_ns()
            ctx = kv.init_batch(Batch(token=tokens, seq_id=seq_ids), 512)
            ctx.apply()
            samples.append(time.perf_counter_ns() - t0)
        for s in range(n_seqs):
            kv.seq_rm(s, start[s], -1)
        done += burst
    return median_us(samples)


def decode_breakdown(kv: KVCache, n_seqs: int, n: int):
    """Median cost of each part of a decode step: Batch(), BatchAllocator.init, the split alone,
    KVCache.init_batch on an initialised allocator (split + slot search + context), apply()."""
    tokens = np.zeros(n_seqs, np.int32)
    seq_ids = np.arange(n_seqs, dtype=np.int32)
    ba = llmem.BatchAllocator(n_seqs)
    out = {"Batch()": [], "allocator init": [], "split only": [], "init_batch": [], "apply": []}
    done = 0
    while done < n:
        burst = min(50, n - done)
        start = [kv.seq_pos_max(s) + 1 for s in range(n_seqs)]
        for _ in range(burst):
            t0 = time.perf_counter_ns()
            b = Batch(token=tokens, seq_id=seq_ids)
            t1 = time.perf_counter_ns()
            ba.init(b, kv)
            t2 = time.perf_counter_ns()
            ba.split_reset()
            while ba.split_simple(512):
                pass
            t3 = time.perf_counter_ns()
            ctx = kv.init_batch(ba, 512)
            t4 = time.perf_counter_ns()
            ctx.apply()
            t5 = time.perf_counter_ns()
            for k, v in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                out[k].append(v)
        for s in range(n_seqs):
            kv.seq_rm(s, start[s], -1)
        done += burst
    return {k: median_us(v) for k, v in out.items()}


def seq_rm_tail(kv: KVCache, n: int):
    samples = []
    tok = np.zeros(1, np.int32)
    for k in range(n):
        s = k % kv.n_seq_max
        p = kv.seq_pos_max(s)
        t0 = time.perf_counter_ns()
        kv.seq_rm(s, p, -1)
        samples.append(time.perf_counter_ns() - t0)
        ctx = kv.init_batch(Batch(token=tok, seq_id=np.array([s], np.int32)), 8)
        ctx.apply()
    return median_us(samples)


def seq_ops(kv: KVCache, reps: int):
    """seq_cp of one whole sequence into a spare id and back out, seq_add of its second half."""
    spare = kv.n_seq_max - 1
    kv.seq_rm(spare)
    cp, rm, add = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        kv.seq_cp(0, spare)
        cp.append(time.perf_counter_ns() - t0)
        t0 = time.perf_counter_ns()
        kv.seq_rm(spare)
        rm.append(time.perf_counter_ns() - t0)
        half = kv.seq_pos_max(0) // 2
        t0 = time.perf_counter_ns()
        kv.seq_add(0, half, -1, 3)
        kv.seq_add(0, half + 3, -1, -3)
        add.append((time.perf_counter_ns() - t0) / 2)
    return median_us(cp), median_us(rm), median_us(add)


def seq_keep_once(n_cells: int, n_seqs: int):
    kv = filled_cache(n_cells, n_seqs)
    t0 = time.perf_counter_ns()
    kv.seq_keep(0)
    return (time.perf_counter_ns() - t0) / 1e6


def reference_baseline(n_cells: int, n_seqs: int, steps: int):
    """Same decode step and seq_rm on the pure-Python reference and on llmem (same sizes)."""
    ref = RefKV(n_cells, n_seqs)
    per_seq = n_cells // 2 // n_seqs
    for s in range(n_seqs):
        ref.decode([[((s,), p) for p in range(per_seq)]])
    samples = []
    for _ in range(steps):
        toks = [((s,), ref.seq_pos_max(s) + 1) for s in range(n_seqs)]
        t0 = time.perf_counter_ns()
        ref.decode([toks])
        samples.append(time.perf_counter_ns() - t0)
    ref_decode = median_us(samples)
    samples = []
    for k in range(steps):
        s = k % n_seqs
        p = ref.seq_pos_max(s)
        t0 = time.perf_counter_ns()
        ref.seq_rm(s, p, -1)
        samples.append(time.perf_counter_ns() - t0)
    ref_rm = median_us(samples)
    kv = filled_cache(n_cells, n_seqs)
    return ref_decode, decode_steps(kv, n_seqs, steps), ref_rm, seq_rm_tail(kv, steps)


def k_shift_throughput(n_cells: int, n_layer: int, n_embd: int, dtype):
    kv = KVCache(n_layer, n_embd, 8, n_cells, dtype_k=dtype, rope=Rope(64, head_dim=128))
    rng = np.random.default_rng(0)
    for il in range(n_layer):
        kv.k(il)[...] = rng.standard_normal(kv.k(il).shape).astype(kv.k(il).dtype)
    batch = Batch(token=np.zeros(n_cells, np.int32), output=np.zeros(n_cells, bool))
    for _ in kv.init_batch(batch, n_cells):
        pass
    kv.seq_add(0, -1, -1, 17)
    upd = kv.init_update()
    t0 = time.perf_counter()
    upd.apply()
    dt = time.perf_counter() - t0
    nbytes = sum(kv.k(il).nbytes for il in range(n_layer))
    return dt * 1e3, 2 * nbytes / dt / 1e9  # read + write


def cpy_throughput(n_tokens: int, n_embd: int, reps: int):
    kv = KVCache(1, n_embd, n_embd, 8192, dtype_k=np.float16, dtype_v=np.float16)
    ctx = kv.init_batch(Batch(token=np.zeros(n_tokens, np.int32)), n_tokens)
    ctx.apply()
    cur = np.random.default_rng(0).standard_normal((n_tokens, n_embd)).astype(np.float16)
    out = {}
    for name, fn in (("cpy_k", ctx.cpy_k), ("cpy_v (transposed)", ctx.cpy_v)):
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            fn(0, cur)
            samples.append(time.perf_counter_ns() - t0)
        us = median_us(samples)
        out[name] = (us, cur.nbytes / (us * 1e-6) / 1e9)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
    args = ap.parse_args(argv)
    q = args.quick
    steps = 200 if q else 2000

    print("== memory part of a decode step (Batch from numpy -> init_batch -> apply), median ==")
    for n_cells, n_seqs, target in ((65536, 64, 15.0), (1 << 20, 256, 20.0)):
        kv = filled_cache(n_cells, n_seqs)
        us = decode_steps(kv, n_seqs, steps)
        print(f"  {n_seqs:4d} seqs, {n_cells:8d} cells half full: {us:8.2f} us   (target <= {target} us)")
        parts = decode_breakdown(kv, n_seqs, 100 if q else 500)
        print("      parts: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) + " (us)")
        rm = seq_rm_tail(kv, steps)
        print(f"  seq_rm of a one-token tail at {n_cells:8d} cells: {rm:8.2f} us   (target <= 2 us)")
        cp, rm_all, add = seq_ops(kv, 20 if q else 100)
        per = n_cells // 2 // n_seqs
        print(f"  one sequence of {per} cells: seq_cp {cp:8.1f} us, seq_rm(all) {rm_all:8.1f} us, "
              f"seq_add(half) {add:8.1f} us")

    print("== seq_keep (touches every used cell) ==")
    for n_cells, n_seqs in ((65536, 64), (1 << 20, 256)):
        print(f"  {n_seqs:4d} seqs, {n_cells:8d} cells half full: {seq_keep_once(n_cells, n_seqs):8.2f} ms")

    print("== scaling: the same sequence operations in caches of growing size (64 seqs of 256 cells) ==")
    for n_cells in (32768, 262144, 1 << 20):
        kv = filled_cache(n_cells, 64, fill=64 * 256 / n_cells)
        cp, rm_all, add = seq_ops(kv, 20 if q else 100)
        rm = seq_rm_tail(kv, 200 if q else 1000)
        print(f"  {n_cells:8d} cells: seq_rm tail {rm:6.2f} us, seq_cp {cp:7.1f} us, "
              f"seq_rm(seq) {rm_all:7.1f} us, seq_add {add:7.1f} us")

    print("== pure-Python reference (tests/python/reference/ref_kv.py) vs llmem, same workload ==")
    n_cells, n_seqs = 2048, 16
    ref_dec, kv_dec, ref_rm, kv_rm = reference_baseline(n_cells, n_seqs, 10 if q else 40)
    print(f"  decode step, {n_seqs} seqs, {n_cells} cells: reference {ref_dec:10.1f} us, llmem {kv_dec:6.2f} us "
          f"(x{ref_dec / kv_dec:,.0f})")
    print(f"  seq_rm tail:                       reference {ref_rm:10.1f} us, llmem {kv_rm:6.2f} us "
          f"(x{ref_rm / kv_rm:,.0f})")

    print("== K-shift (RoPE re-rotation of every shifted K row, n_rot 64 of head_dim 128) ==")
    cells = 4096 if q else 16384
    for dtype in (np.float16, np.float32, "bf16"):
        ms, gbs = k_shift_throughput(cells, 4, 1024, dtype)
        print(f"  {cells} cells x 4 layers x 1024 ({np.dtype(np.uint16 if dtype == 'bf16' else dtype).name if dtype != 'bf16' else 'bf16'}): "
              f"{ms:8.1f} ms, {gbs:6.2f} GB/s")

    print("== cpy_k / cpy_v (512 tokens x 1024 f16) ==")
    for name, (us, gbs) in cpy_throughput(512, 1024, 20 if q else 200).items():
        print(f"  {name:20s} {us:8.1f} us, {gbs:6.2f} GB/s")


if __name__ == "__main__":
    main()
