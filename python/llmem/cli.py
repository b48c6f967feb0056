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
    _add_demo(sub)
    return parser


def _add_plan(sub: Any) -> None:
    p = sub.add_parser(
        "plan", help="show the memory llama.cpp would allocate for a GGUF model",
        description="Read a GGUF model's hyper-parameters (metadata only) and print the memory "
                    "llama.cpp allocates for it: cells, layers and MiB per component and buffer.")
    p.add_argument("model", metavar="MODEL.gguf", help="path to a GGUF file")
    p.add_argument("--ctx", type=int, default=4096, metavar="N",
                   help="context size n_ctx (0 = the model's training context; default 4096)")
    p.add_argument("--parallel", type=int, default=1, metavar="S",
                   help="number of sequences n_seq_max (default 1)")
    p.add_argument("--unified", dest="unified", action="store_true", default=True,
                   help="one KV stream shared by all sequences (default)")
    p.add_argument("--no-unified", dest="unified", action="store_false",
                   help="one KV stream per sequence")
    for name, default in (("k", "f16"), ("v", "f16"), ("r", "f32"), ("s", "f32")):
        p.add_argument(f"--type-{name}", default=default, metavar="TYPE",
                       help=f"{name.upper()} buffer type: f32, f16 or bf16 (default {default})")
    p.add_argument("--swa-full", action="store_true", help="full-size SWA cache")
    p.add_argument("--ubatch", type=int, default=512, metavar="N",
                   help="micro-batch size n_ubatch (default 512)")
    p.add_argument("--batch", type=int, default=2048, metavar="N",
                   help="logical batch size n_batch (default 2048)")
    p.add_argument("--flash-attn", action="store_true",
                   help="flash attention (V not transposed)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_run_plan)


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
            cells, streams, bufs, label = comp.mem_size, 1, (comp.r, comp.s), name
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


def _run_plan(args: argparse.Namespace) -> int:
    from .hparams import read_gguf_hparams
    from .plan import plan_memory

    try:
        hp = read_gguf_hparams(args.model)
        plan = plan_memory(hp, args.ctx, args.parallel, unified=args.unified,
                           type_k=args.type_k, type_v=args.type_v, type_r=args.type_r,
                           type_s=args.type_s, swa_full=args.swa_full, n_ubatch=args.ubatch,
                           n_batch=args.batch, flash_attn=args.flash_attn)
    except (OSError, ValueError, TypeError) as exc:
        print(f"llmem plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(_format_plan(plan))
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
