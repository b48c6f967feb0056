"""llmem against llama.cpp's memory layer, side by side, in one run.

    python -m bench                     # quick mode (under a minute): 3 cache sizes, fewer repeats
    python -m bench --full              # 4k..1M cells x 1..255 sequences, more repeats
    python -m bench --json out.json --plot out.png --only seq_ops decode

Each workload prints llmem's time, the baselines measured in the same run (llama.cpp through
llama-cpp-python's C API, or its own memory classes driven from C++ for the decode step, prefill,
mask and recurrent rows; the tests' pure-Python reference; numpy.copyto of the same bytes) and the
ratios. llama.cpp is the optional ``bench`` extra (``pip install llmem[bench]``; the C++ driver is
compiled on first use into build/llama_driver/); without it the other baselines still run and
each llama.cpp cell says why it is empty. Times are medians of single calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# OpenBLAS worker threads spin after numpy's import and steal the core from the measured code on
# a small machine (copies ran 20x slower); nothing here uses BLAS.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import llmem  # noqa: E402

from . import llama_baseline, llama_driver  # noqa: E402
from ._timing import Progress, host_probe_ms  # noqa: E402
from .workloads import SEQ_OP_NAMES, Config, plan  # noqa: E402

GROUPS = ("seq_ops", "decode", "prefill", "recurrent", "mask", "state", "kshift", "cpy", "prefix", "capi", "store", "gpu")
GROUPS += ("quant",)  # quantized caches: bench_quant.py prints its own table


def machine_info() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "llmem": getattr(llmem, "__version__", "?"),
        "llama_cpp_python": llama_baseline.version() or None,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def fmt_time(us) -> str:
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.2f} us" if us < 100 else f"{us:.0f} us"
    if us < 1e6:
        return f"{us / 1e3:.2f} ms"
    return f"{us / 1e6:.2f} s"


def fmt_ratio(r) -> str:
    if r is None:
        return "-"
    if r < 0.1:
        return f"{r:.2f}x"
    return f"{r:,.0f}x" if r >= 100 else f"{r:.1f}x"


def fmt_params(p: dict) -> str:
    short = {"n_cells": "cells", "n_seqs": "seqs", "n_kv": "n_kv", "n_tokens": "tok", "n_embd": "embd",
             "n_layer": "layers", "s_row_bytes": "row B", "cells_per_seq": "cells/seq", "n_embd_k": "embd"}
    out = []
    for k, v in p.items():
        if k in ("cells_per_seq",):
            continue
        if k == "layout":
            out.append(str(v))
            continue
        if isinstance(v, int) and v >= 1024 and v % 1024 == 0 and k in ("n_cells",):
            v = f"{v // 1024}k" if v < 1 << 20 else f"{v >> 20}M"
        out.append(f"{short.get(k, k)} {v}")
    return ", ".join(out)


SLOW_HOST = 1.3  # a task whose host probe took this many times the run's fastest is flagged


def print_table(records: list[dict], out=sys.stdout) -> None:
    header = ["workload", "params", "llmem", "llmem min", "llama.cpp", "reference", "numpy copy",
              "vs llama.cpp", "vs reference", "copy bw"]
    rows = []
    notes = {}
    for r in records:
        llama = fmt_time(r["llama_us"])
        mine = fmt_time(r["llmem_us"])
        if r.get("host_slowdown", 1.0) >= SLOW_HOST and r["llmem_us"] is not None:
            mine += " +"
            notes["+"] = (f"+ measured while the host ran slow: its probe took {SLOW_HOST}x or more the run's "
                          "fastest (a shared machine; every row of such a task is slower, baselines too)")
        rows.append([r["workload"], fmt_params(r["params"]), mine, fmt_time(r["llmem_min_us"]), llama,
                     fmt_time(r["reference_us"]), fmt_time(r["copy_us"]), fmt_ratio(r["ratio_llama"]),
                     fmt_ratio(r["ratio_reference"]),
                     f"{100 * r['copy_fraction']:.0f}%" if r["copy_fraction"] else "-"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)] if rows else []
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(header), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for row in rows:
        print(line(row), file=out)
    for n in notes.values():
        print(n, file=out)
    why = {}
    for r in records:
        if r["llama_us"] is None and r["llama_note"]:
            why.setdefault(r["llama_note"], []).append(r["workload"])
    if why:
        print("llama.cpp not measured:", file=out)
        for note, names in why.items():
            names = list(dict.fromkeys(names))
            print(f"  {', '.join(names)}: {note}", file=out)


def check_targets(records: list[dict]) -> list[dict]:
    """Issues 7 and 13's targets, each evaluated on the records of this run that it names."""
    def find(workload, **params):
        for r in records:
            if r["workload"] == workload and all(r["params"].get(k) == v for k, v in params.items()):
                return r
        return None

    out = []

    def target(name, rec, value, goal, ok):
        out.append({"target": name, "value": value, "goal": goal,
                    "met": None if rec is None or value is None else bool(ok),
                    "host_slowdown": rec.get("host_slowdown", 1.0) if rec else None})

    for cells, goal in ((65536, 20), (1 << 20, 200)):
        rec = find("seq_rm (tail of 4)", n_cells=cells, n_seqs=64)
        v = rec and rec["ratio_llama"]
        target(f"seq_rm tail, {cells} cells, vs llama.cpp", rec, v, f">= {goal}x", v and v >= goal)
    for op in ("seq_cp (whole seq)", "seq_add (whole seq)", "seq_keep"):
        rec = find(op, n_cells=1 << 20, n_seqs=64)
        v = rec and rec["ratio_llama"]
        target(f"{op}, 1M cells, vs llama.cpp", rec, v, ">= 20x", v and v >= 20)
    for (cells, seqs), goal in (((65536, 64), 15.0), ((1 << 20, 256), 20.0)):
        rec = find("decode step (1 token/seq)", layout="unified", n_cells=cells, n_seqs=seqs)
        v = rec and rec["llmem_us"]
        target(f"decode step, {seqs} seqs, {cells} cells (us)", rec, v, f"<= {goal}", v and v <= goal)
    # issue 13: llmem at least 2x ahead of llama.cpp's own memory classes in every decode-step and
    # mask row, and the one-call decode step (where the tree has it) within 3 us / 10 us
    for r in records:
        if r["group"] in ("decode", "mask") and r["llmem_us"] is not None:
            v = r["ratio_llama"]
            target(f"{r['workload']} ({fmt_params(r['params'])}), vs llama.cpp", r, v, ">= 2x", v and v >= 2)
    for (cells, seqs), goal in (((65536, 64), 3.0), ((1 << 20, 256), 10.0)):
        rec = find("decode step (1 token/seq)", layout="unified", n_cells=cells, n_seqs=seqs)
        one_call = rec is not None and rec["extra"].get("llmem_api", "").startswith("decode_step")
        v = rec["llmem_us"] if one_call else None
        target(f"one-call decode_step, {seqs} seqs, {cells} cells (us, with k/v idxs)", rec if one_call else None,
               v, f"<= {goal}", v is not None and v <= goal)
    for r in records:
        if r["copy_fraction"] is not None:
            target(f"{r['workload']} ({fmt_params(r['params'])}), fraction of numpy copy", r,
                   r["copy_fraction"], ">= 0.70", r["copy_fraction"] >= 0.70)
    return out


def print_targets(targets: list[dict], out=sys.stdout) -> None:
    print("\nTargets (issues 7 and 13):", file=out)
    for t in targets:
        v = t["value"]
        shown = "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
        status = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        slow = t.get("host_slowdown") or 1.0
        flag = f" (host slow: {slow:.1f}x)" if slow >= SLOW_HOST else ""
        print(f"  {t['target']}: {shown} (goal {t['goal']}) {status}{flag}", file=out)


def plot(records: list[dict], path: str, n_seqs: int = 64) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in SEQ_OP_NAMES if any(r["workload"] == op for r in records)]
    if not ops:
        return
    cols = 4
    rows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        recs = sorted((r for r in records if r["workload"] == op and r["params"].get("n_seqs") == n_seqs),
                      key=lambda r: r["params"]["n_cells"])
        for key, label, style in (("llmem_us", "llmem", "o-"), ("llama_us", "llama.cpp", "s-"),
                                  ("reference_us", "Python reference", "^--")):
            pts = [(r["params"]["n_cells"], r[key]) for r in recs if r[key]]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("cache size (cells, half full)")
        ax.set_ylabel("time per call (us)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Sequence operations vs cache size: {n_seqs} sequences in a half-full cache, so one "
                 f"sequence holds cells / {2 * n_seqs} (log-log)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def decode_plot_path(path: str) -> str:
    """Where --plot PATH puts the decode-step figure: PATH's name with ``_decode`` added."""
    root, ext = os.path.splitext(path)
    return f"{root}_decode{ext or '.png'}"


def plot_decode(records: list[dict], path: str) -> bool:
    """Bars of llmem and llama.cpp per decode-step / mask row (log scale); False if none."""
    rows = [r for r in records if r["group"] == "decode" and r["llmem_us"] is not None and r["llama_us"]]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(len(kinds), 1, figsize=(11, 2.8 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        recs = [r for r in rows if r["workload"] == kind]
        labels = [fmt_params(r["params"]).replace(", cells", "\ncells") for r in recs]
        x = np.arange(len(recs))
        ax.bar(x - 0.2, [r["llmem_us"] for r in recs], 0.4, label="llmem (from Python)")
        ax.bar(x + 0.2, [r["llama_us"] for r in recs], 0.4, label="llama.cpp (its classes, in C++)")
        for xi, r in zip(x, recs):
            ax.annotate(fmt_ratio(r["ratio_llama"]), (xi, max(r["llmem_us"], r["llama_us"])), ha="center",
                        va="bottom", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("us per call")
        ax.set_title(f"{kind}: llmem vs llama.cpp (ratio above the bars)", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="under a minute (the default)")
    mode.add_argument("--full", action="store_true", help="every size and sequence count")
    ap.add_argument("--json", metavar="PATH", help="write one record per (workload, params)")
    ap.add_argument("--plot", metavar="PATH", help="PNG of the sequence operations vs cache size")
    ap.add_argument("--only", nargs="+", choices=GROUPS, metavar="NAME",
                    help=f"run only these groups ({', '.join(GROUPS)})")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp baseline")
    args = ap.parse_args(argv)
    if args.only == ["gpu"]:
        from . import bench_gpu  # K/V on a CUDA device through torch storage (skips without one)
        return bench_gpu.run(quick=not args.full)
    if args.only == ["prefix"]:
        from . import bench_prefix  # its own tables: the prefix cache and the checkpoints
        bench_prefix.run(quick=not args.full)
        return 0
    if args.only == ["quant"]:
        from . import bench_quant
        bench_quant.run(quick=not args.full)
        return 0
    if args.only == ["store"]:
        from . import bench_store  # its own tables: the state store against raw Redis
        bench_store.run(quick=not args.full)
        return 0

    cfg = Config(quick=not args.full, use_llama=not args.no_llama)
    if cfg.use_llama and not llama_driver.available():
        print(f"llama.cpp's memory classes cannot be driven ({llama_driver.unavailable_reason()}): the decode, "
              "prefill, mask and recurrent rows run without llama.cpp.", file=sys.stderr)
    if cfg.use_llama and not llama_baseline.available():
        print(f"llama.cpp baseline unavailable ({llama_baseline.unavailable_reason()}); "
              f"install it with: pip install 'llmem[bench]' (llama-cpp-python=="
              f"{llama_baseline.LLAMA_CPP_VERSION}, a build of several minutes). Running the rest.",
              file=sys.stderr)
    tasks = [t for t in plan(cfg) if not args.only or t[0] in args.only]
    info = machine_info()
    t0 = time.perf_counter()
    records: list[dict] = []
    bar = Progress(len(tasks))
    for group, label, thunk in tasks:
        bar.step(label)
        probe = host_probe_ms()
        for res in thunk():
            rec = res.record()
            rec["group"] = group
            rec["host_probe_ms"] = round(probe, 3)
            records.append(rec)
        bar.advance()
    fastest = min((r["host_probe_ms"] for r in records), default=0.0)
    for r in records:
        r["host_slowdown"] = round(r["host_probe_ms"] / fastest, 2) if fastest else 1.0
    bar.close()
    wall = time.perf_counter() - t0
    info["wall_s"] = round(wall, 1)
    info["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    print(f"llmem {info['llmem']} vs llama.cpp (llama-cpp-python {info['llama_cpp_python'] or 'absent'}), "
          f"{'quick' if cfg.quick else 'full'} mode, {wall:.0f} s; {info['cpu']}, {info['cores']} cores, "
          f"load {info['load_average'][0]:.1f}" if info["load_average"] else "")
    print_table(records)
    targets = check_targets(records)
    print_targets(targets)
    capi_records = []
    if not args.only or "capi" in args.only:  # the C API's per-call costs (bench_capi.py)
        from . import bench_capi

        capi_records = bench_capi.run(quick=cfg.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": "quick" if cfg.quick else "full", "machine": info, "results": records,
                       "targets": targets, "capi": capi_records}, f, indent=1)
    if args.plot:
        plot(records, args.plot)
        plot_decode(records, decode_plot_path(args.plot))
    if not args.only or "prefix" in args.only:
        from . import bench_prefix  # its own tables: the prefix cache and the checkpoints
        bench_prefix.run(quick=cfg.quick)
    if not args.only or "quant" in args.only:
        from . import bench_quant  # its own table: quantized caches against f16 and a copy
        bench_quant.run(quick=cfg.quick)
    if not args.only or "store" in args.only:
        from . import bench_store  # its own tables: the state store against raw Redis
        bench_store.run(quick=cfg.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
