"""Batch construction, validation and splitting from Python.

For each workload: build a ``Batch`` from numpy arrays, ``BatchAllocator.init`` it against a memory
that reports each sequence's last position, and split it the way the memories do (simple for a
unified KV cache, equal-sequential for recurrent / per-stream caches). Prints microseconds per
decode step; the pure-Python reference allocator of the tests, when present, gives a baseline.

    python bench/bench_batch.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import per_call_us, print_table  # noqa: E402

import llmem  # noqa: E402


class LastPositions:
    """A memory stand-in: every sequence holds positions [0, last]."""

    def __init__(self, n_seq: int, last: int) -> None:
        self.last = last
        self.n_seq = n_seq

    def seq_pos_min(self, s: int) -> int:
        return 0

    def seq_pos_max(self, s: int) -> int:
        return self.last


def workloads():
    # (name, n_seqs, tokens per sequence, n_ubatch)
    return [
        ("decode 1 seq x 1 token", 1, 1, 512),
        ("decode 64 seqs x 1 token", 64, 1, 512),
        ("decode 256 seqs x 1 token", 256, 1, 512),
        ("prefill 1 seq x 512 tokens", 1, 512, 512),
        ("prefill 1 seq x 4096 tokens, ubatch 512", 1, 4096, 512),
    ]


def run(quick: bool = False):
    budget = 0.1 if quick else 0.4
    rows = []
    for name, n_seqs, n_per, n_ubatch in workloads():
        n = n_seqs * n_per
        seq_id = np.repeat(np.arange(n_seqs, dtype=np.int32), n_per)
        pos = np.tile(np.arange(100, 100 + n_per, dtype=np.int32), n_seqs)
        token = (np.arange(n, dtype=np.int32) % 1000).astype(np.int32)
        balloc = llmem.BatchAllocator(max(n_seqs, 1), n_vocab=32000)
        memory = LastPositions(n_seqs, 99)

        def build_only():
            return llmem.Batch(token=token, pos=pos, seq_id=seq_id)

        def step(split: str):
            b = llmem.Batch(token=token, pos=pos, seq_id=seq_id)
            balloc.init(b, memory)
            if split == "simple":
                while balloc.split_simple(n_ubatch):
                    pass
            else:
                while balloc.split_equal(n_ubatch, True):
                    pass

        t_build = per_call_us(build_only, budget_s=budget)
        t_simple = per_call_us(lambda: step("simple"), budget_s=budget)
        t_equal = per_call_us(lambda: step("equal"), budget_s=budget)
        rows.append((name, t_build, t_simple, t_equal, t_simple / n))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    print_table("Batch -> BatchAllocator.init -> split, from Python (µs per decode step, best of 7)",
                ["workload", "Batch()", "+init+split_simple", "+init+split_equal(seq)", "µs/token (simple)"],
                rows)
    print("\nThe memory stand-in is a Python object, so init also pays a Python call per sequence;")
    print("llmem's own memories answer from C++ (see the KV and recurrent benchmarks).")


if __name__ == "__main__":
    main()
