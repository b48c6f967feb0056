"""Per-call cost of the C API (issue 18): Python, Cython through llmem._core._C_API, pure C++ core.

    python -m bench --only capi

The same KV cache (65536 cells, half full, its sequences side by side) is driven three ways:
from Python (llmem.KVCache), from a Cython extension through the C API without the GIL
(tests/python/capi_ext/capi_driver.pyx, compiled here with Cython from PyPI; each call locking, and
with the lock held around the loop as a server's step holds it), and by a C++ loop
calling the compiled core directly (llmem._core._time_core: no handle, lock or exception guard).
Each figure is the median over rounds (the variants taken in turn) of the mean of a loop of calls. Target: the Cython path
within 20% of the pure C++ core. The llama.cpp column is llama.cpp's own llama_kv_cache holding the
same cells, driven from C++ by the bench's llama.cpp driver (bench/llama_driver.cpp) in the same
rounds: seq_pos_max in a timed loop, a one-token seq_rm per call, the decode step (batch,
allocator, init_batch, apply, k/v indices) per step; "-" with the reason where the driver is
unavailable.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import llmem
from llmem import _core

N_CELLS = 65536
TARGET = 1.20  # Cython / C++ core

_HERE = os.path.dirname(os.path.abspath(__file__))


def _driver():
    """The Cython consumer of the tests, compiled into a temporary directory (once per run)."""
    sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests", "python", "capi_ext"))
    try:
        import build_driver
    finally:
        sys.path.pop(0)
    return build_driver.build(tempfile.mkdtemp(prefix="llmem-capi-bench-"))


def _filled(n_seqs: int) -> llmem.KVCache:
    """A half-full cache: n_seqs sequences of N_CELLS / 2 / n_seqs tokens, side by side."""
    mem = llmem.KVCache(n_layer=1, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=N_CELLS, n_seq_max=n_seqs)
    per = N_CELLS // 2 // n_seqs
    for s in range(n_seqs):
        ctx = mem.init_batch(llmem.Batch(token=np.zeros(per, np.int32), seq_id=np.full(per, s, np.int32)), 4096)
        for _ub in ctx:
            pass
    return mem


def _trim(mem, seqs, lengths) -> None:
    for s, n in zip(seqs, lengths):
        mem.seq_rm(int(s), int(n), -1)


def _medians(fns, rounds: int) -> list[float]:
    """Median of each variant's rounds, the variants taken in turn every round: a host that runs
    slow for a while slows them alike rather than whichever ran then."""
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, samples):
            out.append(fn())
    return [statistics.median(x) for x in samples]


def _llama_twin(n_seqs: int):
    """llama.cpp's llama_kv_cache of N_CELLS cells holding what _filled holds (one sequence after
    another, half full), or (None, why)."""
    from . import workloads

    cfg = workloads.Config(quick=True, use_llama=True)
    note = workloads.driver_note(cfg)
    if note:
        return None, note
    _, lk, _, note = workloads.twin_caches("unified", N_CELLS, n_seqs, cfg, with_llmem=False)
    return lk, note


def measure(n_seqs: int, drv, rounds: int) -> list[dict]:
    mem = _filled(n_seqs)
    handle = drv.Memory(mem)
    lk, llama_note = _llama_twin(n_seqs)
    seqs = np.arange(n_seqs, dtype=np.int32)
    base_len = [mem.seq_pos_max(int(s)) + 1 for s in seqs]
    seq_list = seqs.tolist()
    rows = []

    # seq_pos_max ------------------------------------------------------------------------------
    reps = 20000

    def py_pos():
        q = mem.seq_pos_max
        t0 = time.perf_counter_ns()
        for i in range(reps):
            q(i % n_seqs)
        return (time.perf_counter_ns() - t0) / reps

    llama = {}  # workload -> llama.cpp's ns per call, sampled in the same rounds

    def llama_rounds(name, fn):
        """fn() as one more variant of the rounds when llama.cpp is driven, else a no-op."""
        samples = llama.setdefault(name, [])

        def run():
            if lk is not None:
                samples.append(fn())
            return 0.0
        return run

    rows.append(("seq_pos_max", *_medians([py_pos, lambda: drv.time_seq_pos_max(handle, n_seqs, reps),
                                            lambda: drv.time_seq_pos_max(handle, n_seqs, reps, True),
                                            lambda: _core._time_core(mem, "seq_pos_max", seq_list, [], reps),
                                            llama_rounds("seq_pos_max", lambda: lk.loop_seq_pos_max(seqs, reps))],
                                           rounds)[:4]))

    # seq_rm tail: one token appended to every sequence (not timed), then cut off again ---------
    tails = seqs.copy()
    p0 = np.array(base_len, dtype=np.int32)

    def grow():
        handle.decode_step(seqs, keep_context=False)

    def py_rm():
        grow()
        rm = mem.seq_rm
        t0 = time.perf_counter_ns()
        for s, p in zip(seq_list, base_len):
            rm(s, p, -1)
        return (time.perf_counter_ns() - t0) / n_seqs

    def cy_rm(hold=False):
        grow()
        return drv.time_seq_rm_tail(handle, tails, p0, hold)

    def cpp_rm():
        grow()
        return _core._time_core(mem, "seq_rm_tail", seq_list, base_len, 1)

    rows.append(("seq_rm (tail of 1)", *_medians([py_rm, cy_rm, lambda: cy_rm(True), cpp_rm,
                                                  llama_rounds("seq_rm (tail of 1)",
                                                               lambda: statistics.median(
                                                                   lk.time_seq_rm_tail(seqs, 1, n_seqs).tolist()))],
                                                 rounds)[:4]))

    # decode step: one token per sequence, cells planned, applied and read back ------------------
    steps = 8

    def py_step():
        step = mem.decode_step
        gc.disable()  # as the main table's timings: a step allocates its context objects
        try:
            t0 = time.perf_counter_ns()
            for _ in range(steps):
                step(seqs).k_idxs()
            ns = (time.perf_counter_ns() - t0) / steps
        finally:
            gc.enable()
        _trim(mem, seq_list, base_len)
        return ns

    def cy_step(hold=False):
        ns = drv.time_decode_step(handle, seqs, steps, hold)
        _trim(mem, seq_list, base_len)
        return ns

    def cpp_step():
        ns = _core._time_core(mem, "decode_step", seq_list, [], steps)
        _trim(mem, seq_list, base_len)
        return ns

    def llama_step():
        ns = statistics.median(lk.decode_steps(seqs, steps, 0).tolist())
        lk.seq_rm(-1, base_len[0], -1)  # every sequence holds base_len[0] tokens (side by side)
        return ns

    rows.append(("decode step (1 token/seq)", *_medians([py_step, cy_step, lambda: cy_step(True), cpp_step,
                                                          llama_rounds("decode step (1 token/seq)", llama_step)],
                                                         rounds)[:4]))
    if lk is not None:
        lk.close()
    out = []
    for name, py_ns, cy_ns, cy_held_ns, cpp_ns in rows:
        ll = llama.get(name)
        out.append({"workload": name, "n_cells": N_CELLS, "n_seqs": n_seqs, "python_us": py_ns / 1e3,
                    "cython_capi_us": cy_ns / 1e3, "cython_capi_held_us": cy_held_ns / 1e3,
                    "cpp_core_us": cpp_ns / 1e3, "cython_vs_core": cy_ns / cpp_ns if cpp_ns else None,
                    "cython_held_vs_core": cy_held_ns / cpp_ns if cpp_ns else None,
                    "llama_us": statistics.median(ll) / 1e3 if ll else None,
                    "llama_note": "" if ll else llama_note})
    return out


def run(quick: bool = True, out=sys.stdout) -> list[dict]:
    """Measure and print the table; returns the records."""
    try:
        drv = _driver()
    except Exception as exc:  # noqa: BLE001 - the bench reports and goes on without this group
        print(f"\nC API bench skipped: the Cython driver did not build ({type(exc).__name__}: {exc}); it needs "
              "Cython and setuptools (pip install cython setuptools)", file=out)
        return []
    rounds = 15 if quick else 45
    records = []
    for n_seqs in (64, 256):
        records += measure(n_seqs, drv, rounds)
    print(f"\nC API per-call cost ({N_CELLS} cells, half full; median of {rounds} rounds):", file=out)
    header = ["workload", "seqs", "Python", "Cython (C API)", "Cython, lock held", "C++ core", "Cython/C++",
              "held/C++", "llama.cpp"]
    lines = [[r["workload"], str(r["n_seqs"]), f"{r['python_us']:.3f} us", f"{r['cython_capi_us']:.3f} us",
              f"{r['cython_capi_held_us']:.3f} us", f"{r['cpp_core_us']:.3f} us", f"{r['cython_vs_core']:.2f}x",
              f"{r['cython_held_vs_core']:.2f}x",
              "-" if r["llama_us"] is None else f"{r['llama_us']:.3f} us"] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(fmt(header), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for row in lines:
        print(fmt(row), file=out)
    notes = sorted({r["llama_note"] for r in records if r["llama_us"] is None and r["llama_note"]})
    print("llama.cpp: its llama_kv_cache holding the same cells, timed inside C++ by the bench's driver "
          "(seq_pos_max: loop mean; seq_rm and the decode step: median per call)"
          + (f"; not measured: {'; '.join(notes)}" if notes else ""), file=out)
    print("Cython (C API): each call takes and frees memory.lock (an uncontended atomic exchange); lock "
          "held: the loop runs under api.lock(), as a server's step does, so each call's lock is the "
          "re-entrant fast path. C++ core: the same calls on the compiled cache, no handle, lock or guard.",
          file=out)
    for key, what in (("cython_vs_core", "each call locking"), ("cython_held_vs_core", "lock held")):
        met = [r for r in records if r[key] is not None and r[key] <= TARGET]
        print(f"Target (Cython through the C API within {TARGET - 1:.0%} of the C++ core), {what}: "
              f"{len(met)} of {len(records)} rows met", file=out)
    return records


if __name__ == "__main__":
    run(quick="--full" not in sys.argv)
