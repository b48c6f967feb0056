"""The ``llmem`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, List, Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="llmem",
        description="llama.cpp's LLM memory layer for Python: KV cache, recurrent state, hybrid.",
    )
    parser.add_argument("--version", action="version", version=f"llmem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_plan(sub)
    _add_inspect(sub)
    _add_demo(sub)
    return parser


def _add_plan(sub: Any) -> None:
    p = sub.add_parser(
        "plan", help="show the memory llama.cpp would allocate for a GGUF model",
        allow_abbrev=False,
        description="Read a GGUF model's hyper-parameters (metadata only) and print the memory "
                    "llama.cpp allocates for it, as llama.cpp logs it (--table: cells, layers "
                    "and MiB per component and buffer; --json: both, as JSON). The flags are "
                    "llama.cpp's (llama-cli, llama-server). Needs the gguf package: "
                    "pip install llmem[gguf].")
    p.add_argument("model", metavar="MODEL.gguf", help="path to a GGUF file")
    p.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=int, default=4096, metavar="N",
                   help="context size n_ctx (0 = the model's training context; default 4096)")
    p.add_argument("-np", "--parallel", dest="parallel", type=int, default=1, metavar="N",
                   help="number of sequences n_seq_max (default 1)")
    p.add_argument("-kvu", "--kv-unified", "--unified", dest="unified", action="store_true",
                   default=False,
                   help="one KV stream shared by all sequences (default, as llama.cpp's: one "
                        "stream per sequence)")
    p.add_argument("--no-unified", dest="unified", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("-ctk", "--cache-type-k", "--type-k", dest="type_k", default="f16", metavar="TYPE",
                   help="K cache type (default f16)")
    p.add_argument("-ctv", "--cache-type-v", "--type-v", dest="type_v", default="f16", metavar="TYPE",
                   help="V cache type (default f16)")
    for name in ("r", "s"):
        p.add_argument(f"--type-{name}", default="f32", metavar="TYPE",
                       help=f"{name.upper()} state type of a recurrent memory (default f32, as "
                            "llama.cpp; others for experiments)")
    p.add_argument("--swa-full", action="store_true", help="full-size SWA cache")
    p.add_argument("-ub", "--ubatch-size", "--ubatch", dest="ubatch", type=int, default=512,
                   metavar="N", help="micro-batch size n_ubatch (default 512)")
    p.add_argument("-b", "--batch-size", "--batch", dest="batch", type=int, default=2048,
                   metavar="N", help="logical batch size n_batch (default 2048)")
    p.add_argument("-fa", "--flash-attn", dest="flash_attn", nargs="?", const="on", default="off",
                   choices=("on", "off", "auto"), metavar="on|off|auto",
                   help="flash attention: V not transposed (default off; auto counts as on, as "
                        "on llama.cpp's CPU, CUDA and Metal backends, which support it)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--table", action="store_true", help="print a table per component and buffer")
    out.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_run_plan)


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect", help="show what a saved state file holds",
        description="Read a state file written by Memory.save (with llmem's versioned header): "
                    "the memory kind and configuration, the sequences with their positions and "
                    "cells, the sizes; --png draws the cell map (needs matplotlib: "
                    "pip install llmem[plot]).")
    p.add_argument("state", metavar="STATEFILE", help="a file written by Memory.save")
    p.add_argument("--png", metavar="PATH", help="draw the cells of every attention cache into a PNG")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from .errors import StateError
    from .statefile import describe_state_file, draw_cell_map, format_description

    try:
        info = describe_state_file(args.state)
    except (OSError, StateError, ValueError) as exc:
        reason = f" ({exc.reason})" if isinstance(exc, StateError) else ""
        print(f"llmem inspect: error{reason}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = {k: v for k, v in info.items() if k != "parts"}
        out["sequences"] = {str(q): list(r) for q, r in info["sequences"].items()}
        out["parts"] = {name: {k: v for k, v in part.items() if k != "cell_seq"}
                        for name, part in info["parts"].items()}
        print(json.dumps(out, indent=2, default=str))
    else:
        print(format_description(info))
    if args.png:
        try:
            draw_cell_map(info, args.png)
        except ImportError:
            print("llmem inspect: error: --png needs matplotlib: pip install llmem[plot]", file=sys.stderr)
            return 2
        print(f"cell map    {args.png}")
    return 0


def _add_demo(sub: Any) -> None:
    from . import demo

    p = sub.add_parser(
        "demo", help="simulate a server on a toy model and prove cached decoding exact",
        description="Serve simulated clients with continuous batching through a tiny numpy model "
                    "on an llmem memory (shared system prompt via seq_cp, one context shift, one "
                    "save/restore), then recompute a sample of the outputs without any cache. "
                    "Exits 1 if any differs.")
    demo.add_arguments(p)
    p.set_defaults(func=demo.main)


def _format_plan(plan: Any) -> str:
    from .status import SWAType

    hp = plan.hparams
    head = [
        f"model:   {hp.arch}, {hp.n_layer} layers -> {plan.kind} memory",
        f"context: n_ctx {plan.n_ctx}, n_ctx_seq {plan.n_ctx_seq}, {plan.n_seq_max} seq(s), "
        f"{'unified' if plan.unified else 'one stream per seq'}, n_ubatch {plan.n_ubatch}, "
        f"v_trans {int(plan.v_trans)}, can_shift {int(plan.can_shift)}",
        "",
    ]
    rows: List[List[str]] = [["component", "buffer", "type", "cells", "streams", "layers",
                              "MiB"]]
    for name, comp in plan.components():
        if hasattr(comp, "kv_size"):
            cells, streams, bufs = comp.kv_size, comp.n_stream, (comp.k, comp.v)
            label = name
            if comp.swa_type != SWAType.NONE:
                label += f" (swa {comp.n_swa})"
        else:
            cells, streams, bufs, label = comp.mem_size, 1, comp.bufs, name
        for b in bufs:
            rows.append([label, b.name, b.dtype, str(cells), str(streams),
                         str(len(comp.layers)), f"{b.mib:.2f}"])
        rows.append([label, "total", "", "", "", "", f"{comp.mib:.2f}"])
    rows.append(["total", "", "", "", "", "", f"{plan.mib:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {3, 4, 5, 6}
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                 enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(head + lines)


def _log_lines(plan: Any) -> List[str]:
    """llama.cpp's log lines for this plan: the context lines llmem reproduces, then the memory's."""
    ctx = [
        ("n_seq_max", str(plan.n_seq_max)),
        ("n_ctx", str(plan.n_ctx)),
        ("n_ctx_seq", str(plan.n_ctx_seq)),
        ("n_batch", str(plan.n_batch)),
        ("n_ubatch", str(plan.n_ubatch)),
        ("flash_attn", "enabled" if plan.flash_attn else "disabled"),
        ("kv_unified", "true" if plan.unified else "false"),
    ]
    return [f"llama_context: {k:<13} = {v}" for k, v in ctx] + list(plan.log_lines())


def _run_plan(args: argparse.Namespace) -> int:
    try:
        from .hparams import read_gguf_hparams
        from .plan import plan_memory

        hp = read_gguf_hparams(args.model)
    except ImportError as exc:
        if getattr(exc, "name", None) != "gguf" and "gguf" not in str(exc):
            raise
        print("llmem plan: error: reading GGUF files needs the gguf package: "
              "pip install llmem[gguf]", file=sys.stderr)
        return 2
    except (OSError, ValueError, TypeError) as exc:
        print(f"llmem plan: error: {exc}", file=sys.stderr)
        return 2
    try:
        plan = plan_memory(hp, args.ctx, args.parallel, unified=args.unified,
                           type_k=args.type_k, type_v=args.type_v, type_r=args.type_r,
                           type_s=args.type_s, swa_full=args.swa_full, n_ubatch=args.ubatch,
                           n_batch=args.batch, flash_attn=args.flash_attn != "off")
    except (ValueError, TypeError) as exc:
        print(f"llmem plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    elif args.table:
        print(_format_plan(plan))
    else:
        print("\n".join(_log_lines(plan)))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
