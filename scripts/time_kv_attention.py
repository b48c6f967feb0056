"""Timing of the decode step's attention metadata and of the one-call decode step, from Python.

Not a test (timings on a shared host are noisy): prints microseconds per call. For each
configuration the cache is filled close to full (every sequence the same length), one decode
step is applied, and then

* ``mask``: ``ctx.kq_mask(out=buf)`` (f32, caller buffer) and ``f16``: the same in float16;
* ``paged``: ``ctx.paged_kv(out=bufs)``;
* ``step``: ``cache.decode_step(ids)`` (the memory's lock included), against ``general``:
  ``Batch(...)`` + ``init_batch`` + ``apply`` for the same step; 100 consecutive steps per sample.

Every figure is the lowest per-call thread CPU time over several samples.

Usage: python scripts/time_kv_attention.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import llmem
from llmem import Batch, KVCache, PagedKV, SWAType


def median_us(fn, reps: int, inner: int) -> float:
    """Per call: the lowest of `reps` samples of the thread's CPU time (the shared host's other
    processes take the CPU away for long stretches; CPU time leaves those out, memory-bandwidth
    contention stays in)."""
    samples = []
    for _ in range(reps):
        t0 = time.thread_time()
        for _ in range(inner):
            fn()
        samples.append((time.thread_time() - t0) / inner * 1e6)
    return min(samples)


def filled(total_cells: int, n_seqs: int, unified: bool, swa=(SWAType.NONE, 0), free: int = 8) -> KVCache:
    per = total_cells // n_seqs
    size = total_cells if unified else per
    c = KVCache(1, 8, 8, size, n_seq_max=n_seqs, unified=unified, dtype_k=np.float16, dtype_v=np.float16,
                swa_type=swa[0], n_swa=swa[1])
    n_tok = per - free
    chunk = max(1, min(n_tok, 65536 // n_seqs))
    done = 0
    while done < n_tok:
        k = min(chunk, n_tok - done)
        ids = np.repeat(np.arange(n_seqs, dtype=np.int32), k)
        ctx = c.init_batch(Batch(token=np.zeros(len(ids), np.int32), seq_id=ids), len(ids))
        assert ctx.status == llmem.Status.SUCCESS, (total_cells, n_seqs, unified, done)
        for _ in ctx:
            pass
        done += k
    return c


def time_mask(label: str, cache: KVCache, n_seqs: int, quick: bool) -> None:
    ids = np.arange(n_seqs, dtype=np.int32)
    ctx = cache.decode_step(ids)
    n_rows = ctx.kq_mask().shape[0]
    buf = np.empty((n_rows, ctx.n_kv), np.float32)
    buf16 = np.empty((n_rows, ctx.n_kv), np.float16)
    n_pages = int(ctx.paged_kv().kv_indptr[-1])
    pbuf = PagedKV.empty(n_seqs, n_seqs, n_pages)
    elems = n_rows * ctx.n_kv
    inner = max(1, min(2000, 2_000_000 // max(elems, 1)))
    reps = 5 if quick else 15
    m = median_us(lambda: ctx.kq_mask(out=buf), reps, inner)
    h = median_us(lambda: ctx.kq_mask(out=buf16, dtype=np.float16), reps, inner)
    p = median_us(lambda: ctx.paged_kv(out=pbuf), reps, inner)
    print(f"{label:<44} n_kv {ctx.n_kv:>7}  mask f32 {m:9.1f} us  f16 {h:9.1f} us  "
          f"({elems * 4 / m / 1e3:5.1f} GB/s f32)  paged {p:8.1f} us ({n_pages} pages)")


def time_step(label: str, cache: KVCache, n_seqs: int, quick: bool) -> None:
    ids = list(range(n_seqs))
    ids_np = np.arange(n_seqs, dtype=np.int32)
    toks = np.zeros(n_seqs, np.int32)
    out = np.ones(n_seqs, bool)
    base = cache.seq_pos_max(0) + 1
    steps = 100  # consecutive steps per sample: the cache keeps more free cells per sequence

    def rollback():
        for s in ids:
            cache.seq_rm(s, base, -1)

    def run(fn):
        samples = []
        for _ in range(5 if quick else 20):
            t0 = time.thread_time()
            for _ in range(steps):
                fn()
            samples.append((time.thread_time() - t0) / steps * 1e6)
            rollback()
        return min(samples)

    def general():
        ctx = cache.init_batch(Batch(token=toks, seq_id=ids_np, output=out), n_seqs)
        ctx.apply()

    s_list = run(lambda: cache.decode_step(ids))
    s_np = run(lambda: cache.decode_step(ids_np, toks))
    g = run(general)
    print(f"{label:<44} decode_step list {s_list:7.2f} us  int32+tokens {s_np:7.2f} us  "
          f"init_batch+apply {g:7.2f} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    K, M = 1 << 16, 1 << 20
    print("masks (one decode step, f32 into a caller buffer):")
    for label, total, n, unified in [("unified 64k cells, 1 seq", K, 1, True),
                                     ("unified 64k cells, 4 seqs", K, 4, True),
                                     ("unified 64k cells, 64 seqs", K, 64, True),
                                     ("streams 64k cells, 64 seqs", K, 64, False),
                                     ("streams 1M cells, 256 seqs", M, 256, False),
                                     ("unified 4k cells, 1 seq", 4096, 1, True),
                                     ("unified 1M cells, 1 seq", M, 1, True)]:
        time_mask(label, filled(total, n, unified), n, a.quick)
    for swa in [(SWAType.STANDARD, 4096), (SWAType.CHUNKED, 8192), (SWAType.SYMMETRIC, 4096)]:
        time_mask(f"unified 64k, 4 seqs, {swa[0].name} {swa[1]}", filled(K, 4, True, swa), 4, a.quick)
    print("decode step (lock included):")
    for label, total, n, unified in [("unified 1M cells, 64 seqs", M, 64, True),
                                     ("unified 1M cells, 256 seqs", M, 256, True),
                                     ("streams 1M cells, 64 seqs", M, 64, False),
                                     ("streams 1M cells, 256 seqs", M, 256, False)]:
        time_step(label, filled(total, n, unified, free=120), n, a.quick)


if __name__ == "__main__":
    main()
