"""Quantized K/V caches (issue 15): the quantize-scatter of a decode step, the K-shift and the state
bytes of q8_0 / q4_0 caches, against the same operation on an f16 cache and a plain memory copy of
the same bytes, measured interleaved in one run.

    python -m bench --only quant            # quick
    python -m bench --only quant --full     # more repeats, a larger cache

Each variant of a row is called in turn, round after round (so a slow patch of a shared host hits
them all), and the table gives the median of each. "copy" is numpy.copyto of the bytes the
operation writes (for the K-shift: the K buffers read and written; for the state: the blob).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from llmem import Batch, KVCache, Rope
from llmem.ggml_types import GGML_TYPES

from ._timing import print_table

N_LAYER = 4
N_EMBD = 1024          # 8 heads of 128
HEAD_DIM = 128


def interleaved_us(fns: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, float]:
    """Median microseconds of one call of each fn, the fns called in turn every round."""
    for fn in fns.values():
        fn()  # warm up
    samples: Dict[str, List[int]] = {k: [] for k in fns}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            samples[k].append(clock() - t0)
    return {k: float(np.median(v)) / 1e3 for k, v in samples.items()}


def _filled(dtype: object, n_cells: int, n_seqs: int = 1, rope: Optional[Rope] = None, n_rot_k: int = 0,
            fill: int = 0) -> KVCache:
    """A cache of N_LAYER layers of N_EMBD and n_cells cells holding ``fill`` (default all) tokens of
    n_seqs sequences, random K/V."""
    quant_v = GGML_TYPES[str(dtype)].quantized if isinstance(dtype, str) else False
    kv = KVCache(N_LAYER, N_EMBD, N_EMBD, n_cells, n_seq_max=max(n_seqs, 1), dtype_k=dtype, dtype_v=dtype,
                 v_trans=not quant_v, rope=rope, n_rot_k=n_rot_k, n_rot_v=64 if n_rot_k else 0)
    rng = np.random.default_rng(0)
    per = (fill or n_cells) // n_seqs
    batch = Batch(token=np.zeros(per * n_seqs, np.int32),
                  seq_id=np.repeat(np.arange(n_seqs, dtype=np.int32), per), output=np.zeros(per * n_seqs, bool))
    ctx = kv.init_batch(batch, 4096)
    for _ub in ctx:
        n = ctx.ubatch.n_tokens
        rows = rng.standard_normal((n, N_EMBD)).astype(np.float32)
        for il in range(N_LAYER):
            ctx.cpy_k(il, rows)
            ctx.cpy_v(il, rows)
    return kv


def cpy_k_rows(quick: bool) -> List[Sequence[object]]:
    """cpy_k of one decode step: 64 sequences, one token each, f32 rows of N_EMBD quantized (or
    converted to f16) into 64 scattered cells of a half-full cache."""
    n_seqs, n_cells = 64, 8192
    out = []
    cur = np.random.default_rng(1).standard_normal((n_seqs, N_EMBD)).astype(np.float32)
    ctxs, fns = {}, {}
    for name in ("f16", "q8_0", "q4_0"):
        kv = _filled(name if name != "f16" else np.float16, n_cells, n_seqs, fill=n_cells // 2)
        step = Batch(token=np.zeros(n_seqs, np.int32), seq_id=np.arange(n_seqs, dtype=np.int32))
        ctx = kv.init_batch(step, n_seqs)
        ctx.apply()
        ctxs[name] = (kv, ctx)
        fns[name] = (lambda c=ctx: c.cpy_k(0, cur))
    row_bytes = {name: GGML_TYPES[name].row_size(N_EMBD) for name in ("f16", "q8_0", "q4_0")}
    srcs = {name: np.zeros(n_seqs * row_bytes[name], np.uint8) for name in row_bytes}
    dsts = {name: np.zeros_like(srcs[name]) for name in row_bytes}
    for name in row_bytes:
        fns[f"copy {name}"] = (lambda s=srcs[name], d=dsts[name]: np.copyto(d, s))
    t = interleaved_us(fns, 200 if quick else 2000)
    for name in ("q8_0", "q4_0", "f16"):
        out.append([f"cpy_k, decode step ({n_seqs} seqs)", name, f"{n_seqs} x {N_EMBD} f32 -> {row_bytes[name]} B rows",
                    t[name], t["f16"], t[f"copy {name}"], f"{t[name] / t['f16']:.2f}x"])
    return out


def k_shift_rows(quick: bool) -> List[Sequence[object]]:
    """init_update().apply() after seq_add of every cell: N_LAYER layers of N_EMBD, partial RoPE
    (n_rot 64 of 128, the existing K-shift row) and full RoPE with the b11549 attention rotation
    (n_rot 128, n_rot_k 128) for the quantized types."""
    n_cells = 4096 if quick else 16384
    out = []
    for label, rope, n_rot_k in (("n_rot 64/128", Rope(64, head_dim=HEAD_DIM), 0),
                                 ("n_rot 128/128, n_rot_k 128", Rope(128, head_dim=HEAD_DIM), 128)):
        fns: Dict[str, Callable[[], object]] = {}
        nbytes = {}
        for name in ("f16", "q8_0", "q4_0"):
            kv = _filled(name if name != "f16" else np.float16, n_cells, 1, rope, n_rot_k if name != "f16" else 0)

            def shift(kv=kv):
                kv.seq_add(0, -1, -1, 17)
                kv.init_update().apply()
            fns[name] = shift
            bufs = [kv.k(il) for il in range(N_LAYER)]
            outs = [np.empty_like(b) for b in bufs]
            nbytes[name] = sum(b.nbytes for b in bufs)
            fns[f"copy {name}"] = (lambda bufs=bufs, outs=outs: [np.copyto(o, b) for o, b in zip(outs, bufs)])
        t = interleaved_us(fns, 5 if quick else 15)
        for name in ("q8_0", "q4_0", "f16"):
            out.append([f"K-shift ({label})", name, f"{n_cells} cells, {N_LAYER} x {N_EMBD}, {nbytes[name] >> 20} MiB",
                        t[name], t["f16"], t[f"copy {name}"], f"{t[name] / t['f16']:.2f}x"])
    return out


def state_rows(quick: bool) -> List[Sequence[object]]:
    """state_write / state_read of one sequence of a q8_0 (and f16) cache: 4096 tokens."""
    n_tokens = 4096 if quick else 16384
    fns: Dict[str, Callable[[], object]] = {}
    sizes = {}
    for name in ("q8_0", "f16"):
        kv = _filled(name if name != "f16" else np.float16, n_tokens, 1)
        blob = kv.state_write(0)
        sizes[name] = len(blob)
        src = np.frombuffer(blob, np.uint8)
        dst = np.empty_like(src)
        fns[f"write {name}"] = (lambda kv=kv: kv.state_write(0))
        fns[f"read {name}"] = (lambda kv=kv, blob=blob: kv.state_read(blob, 0))
        fns[f"copy {name}"] = (lambda s=src, d=dst: np.copyto(d, s))
    t = interleaved_us(fns, 7 if quick else 25)
    out = []
    for op in ("write", "read"):
        for name in ("q8_0", "f16"):
            out.append([f"state_{op} (one seq)", name, f"{n_tokens} tokens, {sizes[name] >> 20} MiB",
                        t[f"{op} {name}"], t[f"{op} f16"], t[f"copy {name}"], f"{t[f'{op} {name}'] / t[f'{op} f16']:.2f}x"])
    return out


def run(quick: bool = True) -> List[Tuple[object, ...]]:
    """Print the table; returns its rows (times in microseconds)."""
    rows = cpy_k_rows(quick) + k_shift_rows(quick) + state_rows(quick)
    header = ["workload", "type", "params", "llmem us", "f16 us", "copy us", "vs f16"]
    print_table("== Quantized caches (interleaved medians; copy = numpy.copyto of the same bytes) ==", header,
                [[r[0], r[1], r[2], f"{r[3]:.1f}", f"{r[4]:.1f}", f"{r[5]:.1f}", r[6]] for r in rows])
    return [tuple(r) for r in rows]
