"""RecurrentMemory from Python: decode steps, the state gather/store path, and size scaling.

1. Decode step for 1, 64 and 256 sequences (one token each, every sequence continuing in its own
   cell): ``Batch`` -> ``BatchAllocator.init`` -> ``init_batch`` -> ``apply`` + ``s_copy_all`` ->
   ``get_s``/``store_s`` on 2 layers. "memory work" is ``init_batch`` + ``apply`` + ``s_copy_all``
   (what the memory does for the step, state copies excluded); batch building is listed apart.
2. Gather/store bandwidth: ``get_s`` + ``store_s`` against ``numpy.copyto`` of the same bytes.
3. Scaling with ``mem_size``: one-sequence operations and a one-sequence decode step stay flat.

    python bench/bench_recurrent.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# OpenBLAS starts worker threads that spin for a while after numpy is imported; on a small shared
# machine they take the core from the measured code (copies ran 20x slower). llmem uses no BLAS.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import per_call_us, print_table  # noqa: E402

import llmem  # noqa: E402
from llmem import RecurrentMemory, Status  # noqa: E402


def decode_step_stages(n_seq: int, steps: int, repeat: int, n_embd_s: int = 1024) -> dict[str, float]:
    """Microseconds per decode step, by stage: for each stage the best mean over `repeat` short
    runs of `steps` steps (short runs, so that on a shared machine some of them run undisturbed)."""
    mem = RecurrentMemory(2, 192, n_embd_s, mem_size=n_seq, n_seq_max=n_seq)
    balloc = llmem.BatchAllocator(n_seq)
    token = np.zeros(n_seq, np.int32)
    seq_id = np.arange(n_seq, dtype=np.int32)
    new_s = np.ones((n_seq, n_embd_s), np.float32)
    clock = time.perf_counter
    best: dict[str, float] = {}
    for rep in range(repeat + 1):  # the first run warms up (and gives every sequence its cell)
        acc = dict.fromkeys(("batch", "init_batch", "apply", "states"), 0.0)
        for _ in range(steps):
            t0 = clock()
            balloc.init(llmem.Batch(token=token, seq_id=seq_id), mem)
            t1 = clock()
            ctx = mem.init_batch(balloc, 512)
            t2 = clock()
            ctx.apply()
            ctx.s_copy_all()
            t3 = clock()
            for il in range(2):
                ctx.get_s(il)
                ctx.store_s(il, new_s)
            t4 = clock()
            assert ctx.status == Status.SUCCESS and not ctx.next()
            acc["batch"] += t1 - t0
            acc["init_batch"] += t2 - t1
            acc["apply"] += t3 - t2
            acc["states"] += t4 - t3
        if rep:
            for k, v in acc.items():
                best[k] = min(best.get(k, float("inf")), v / steps * 1e6)
    best["memory work"] = best["init_batch"] + best["apply"]
    best["total"] = best["memory work"] + best["batch"] + best["states"]
    return best


def gather_store_bandwidth(n_seq: int, row_floats: int, steps: int, repeat: int) -> tuple[float, float, float]:
    """(MB moved per step, GB/s of get_s + store_s, GB/s of numpy.copyto on the same bytes)."""
    mem = RecurrentMemory(1, 1, row_floats, mem_size=n_seq, n_seq_max=n_seq)
    balloc = llmem.BatchAllocator(n_seq)
    token = np.zeros(n_seq, np.int32)
    seq_id = np.arange(n_seq, dtype=np.int32)
    new_s = np.ones((n_seq, row_floats), np.float32)
    clock = time.perf_counter
    best = float("inf")
    for rep in range(repeat + 1):
        spent = 0.0
        for _ in range(steps):
            balloc.init(llmem.Batch(token=token, seq_id=seq_id), mem)
            ctx = mem.init_batch(balloc, 512)
            ctx.apply()
            t0 = clock()
            ctx.get_s(0)
            ctx.store_s(0, new_s)
            spent += clock() - t0
        if rep:
            best = min(best, spent / steps)
    moved = 2 * n_seq * row_floats * 4  # rows read out + rows written back
    buf = mem.s(0)
    out = np.empty_like(new_s)

    def copies():
        np.copyto(out, buf[:n_seq])
        np.copyto(buf[:n_seq], new_s)

    numpy_s = per_call_us(copies, repeat=repeat) * 1e-6
    return moved / 1e6, moved / best / 1e9, moved / numpy_s / 1e9


def scaling(mem_size: int) -> list[float]:
    """Microseconds of one-sequence operations in a memory of mem_size cells, half of them used."""
    mem = RecurrentMemory(1, 4, 4, mem_size=mem_size, n_seq_max=mem_size)
    balloc = llmem.BatchAllocator(mem_size)
    half = mem_size // 2
    balloc.init(llmem.Batch(token=np.zeros(half, np.int32), seq_id=np.arange(half, dtype=np.int32)), mem)
    for _ in mem.init_batch(balloc, max(512, half)):
        pass
    one = llmem.Batch(token=np.zeros(1, np.int32), seq_id=np.array([half - 1], np.int32))

    def decode_one():
        balloc.init(one, mem)
        ctx = mem.init_batch(balloc, 512)
        ctx.apply()

    def copy_and_drop():
        mem.seq_cp(half - 1, half)
        mem.seq_rm(half, -1, -1)

    return [
        per_call_us(lambda: mem.seq_pos_max(half - 1)),
        per_call_us(copy_and_drop),
        per_call_us(lambda: mem.seq_add(half - 1, -1, -1, 0)),
        per_call_us(decode_one),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (noisier figures)")
    args = parser.parse_args()
    repeat = 3 if args.quick else 7

    rows = []
    for n_seq in (1, 64, 256):
        st = decode_step_stages(n_seq, 10, 40 * repeat)
        rows.append([n_seq, st["batch"], st["init_batch"], st["apply"], st["memory work"], st["states"],
                     st["total"]])
    print_table("Decode step, us (2 layers, s rows of 4 KiB; per stage the best of %d runs of 10 steps)" % (40 * repeat),
                ["n_seq", "Batch+init", "init_batch", "apply+s_copy", "memory work", "get/store_s x2", "total"],
                rows)

    rows = []
    for n_seq, row_floats in ((64, 1024), (64, 16384), (256, 16384)):
        mb, ours, ref = gather_store_bandwidth(n_seq, row_floats, 20 if args.quick else 60, repeat)
        rows.append([n_seq, row_floats * 4 // 1024, mb, ours, ref, ours / ref])
    print_table("State gather + store (get_s + store_s) vs numpy.copyto of the same bytes",
                ["n_seq", "row KiB", "MB/step", "GB/s llmem", "GB/s copyto", "ratio"], rows)

    rows = [[size, *scaling(size)] for size in (64, 1024, 16384)]
    print_table("One-sequence cost vs mem_size (half the cells used), us",
                ["mem_size", "seq_pos_max", "seq_cp+seq_rm", "seq_add", "decode 1 token"], rows)


if __name__ == "__main__":
    main()
