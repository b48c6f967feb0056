"""The workloads of ``python -m bench``: each measures llmem and, in the same run, its baselines.

Every workload function yields ``Result`` records. Baselines:

* ``llama`` - llama.cpp itself through llama-cpp-python's C API (``llama_baseline.py``); for the
  decode step, whose memory part cannot be timed from outside llama_decode, the figures the issue
  states for llama.cpp's internal memory path (marked "stated").
* ``reference`` - the pure-Python reference implementations of the tests
  (``tests/python/reference``), or a plain numpy version where those do not model bytes.
* ``copy`` - ``numpy.copyto`` of the same bytes, the bandwidth ceiling of a data-moving operation.

Times are the median of single calls (perf_counter_ns from Python, so llmem and llama.cpp both pay
one foreign call), minima are kept in the JSON.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

import llmem
from llmem import Batch, KVCache, RecurrentMemory, Rope

from . import llama_baseline
from ._timing import median_min_us, sample_ns

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
from reference.ref_kv import RefKV  # noqa: E402
from reference.ref_recurrent import RefRecurrent  # noqa: E402

# llama.cpp's own memory path inside llama_decode (batch allocator init + memory init_batch +
# apply), as measured for the issue; it cannot be separated from the model compute from outside.
LLAMA_DECODE_STATED_US = {(64, 65536): 74.0, (256, 1 << 20): 707.0}

TAIL = 4  # tokens in "a short tail"


@dataclass
class Result:
    workload: str
    params: dict
    llmem_us: float
    llmem_min_us: float
    llama_us: Optional[float] = None
    llama_min_us: Optional[float] = None
    llama_note: str = ""  # "stated", or why there is no figure
    reference_us: Optional[float] = None
    reference_note: str = ""  # what the reference is, when not the tests' reference
    copy_us: Optional[float] = None
    nbytes: Optional[int] = None  # bytes moved, for the data-moving workloads
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        out = asdict(self)
        out["ratio_llama"] = self.llama_us / self.llmem_us if self.llama_us else None
        out["ratio_reference"] = self.reference_us / self.llmem_us if self.reference_us else None
        out["copy_fraction"] = self.copy_us / self.llmem_us if self.copy_us else None
        return out


@dataclass
class Config:
    quick: bool
    use_llama: bool

    @property
    def reps(self) -> int:
        return 15 if self.quick else 60

    def reference_fits(self, n_cells: int) -> bool:
        """The Python reference walks every cell, so it is measured only up to this size."""
        return n_cells <= (65536 if self.quick else 262144)

    def reference_copies_fit(self, n_cells: int) -> bool:
        """Placing tokens in the reference deep-copies every cell first (seconds at 64k cells),
        so decode, prefill and state_read run on it only up to this size."""
        return n_cells <= (8192 if self.quick else 65536)


def _stats(samples):
    return median_min_us(samples)


# ---------------------------------------------------------------------------------------------
# sequence operations on a half-full cache: llmem vs llama.cpp vs the reference
# ---------------------------------------------------------------------------------------------

def filled_kv(n_cells: int, n_seqs: int) -> tuple[KVCache, int]:
    """llmem's twin of the llama.cpp context (one layer, 16-dim K/V rows in f16, V not
    transposed as with flash attention): n_seqs sequences of n_cells / 2 / n_seqs tokens each,
    placed sequence after sequence, and one spare sequence id (n_seqs) for seq_cp to copy into.
    Returns (cache, tokens per sequence)."""
    kv = KVCache(1, llama_baseline.N_EMBD, llama_baseline.N_EMBD, n_cells, n_seq_max=n_seqs + 1,
                 v_trans=False, rope=Rope(llama_baseline.N_EMBD, head_dim=llama_baseline.N_EMBD))
    per_seq = n_cells // 2 // n_seqs
    n = per_seq * n_seqs
    rng = np.random.default_rng(1)
    batch = Batch(token=np.zeros(n, np.int32), seq_id=np.repeat(np.arange(n_seqs, dtype=np.int32), per_seq),
                  output=np.zeros(n, bool))
    for _ in kv.init_batch(batch, n):
        pass
    kv.k(0)[0, :n] = rng.standard_normal((n, llama_baseline.N_EMBD)).astype(np.float16)
    kv.v(0)[0, :n] = kv.k(0)[0, :n]
    return kv, per_seq


class RefSide:
    """The tests' RefKV filled directly with the same layout (a decode through the reference
    deep-copies every cell per micro-batch, far too slow for a set-up)."""

    def __init__(self, n_cells: int, n_seqs: int, per_seq: int) -> None:
        self.ref = RefKV(n_cells, n_seqs + 1)
        self.n_seqs, self.per_seq = n_seqs, per_seq
        for s in range(n_seqs):
            self.restore_seq(s)
        self.ref.heads[0] = n_seqs * per_seq

    def restore_seq(self, s: int) -> None:
        cells = self.ref.cells[0]
        base = s * self.per_seq
        for p in range(self.per_seq):
            c = cells[base + p]
            c.pos, c.shift, c.seqs = p, 0, {s}

    def refill(self) -> None:
        for s in range(self.n_seqs):
            self.restore_seq(s)


def seq_ops(n_cells: int, n_seqs: int, cfg: Config) -> Iterator[Result]:
    """seq_pos_max, seq_add of a whole sequence, seq_rm of a short tail, seq_cp of a whole
    sequence, seq_rm of a whole sequence, state_write/state_read of one sequence, seq_keep."""
    params = {"n_cells": n_cells, "n_seqs": n_seqs, "cells_per_seq": n_cells // 2 // n_seqs}
    kv, per_seq = filled_kv(n_cells, n_seqs)
    blobs = {s: kv.state_write(s) for s in range(min(n_seqs, cfg.reps * 4))}
    seqs = list(blobs)

    lm = None
    llama_note = ""
    if cfg.use_llama and n_seqs + 1 > llama_baseline.LLAMA_MAX_SEQ:
        llama_note = f"llama.cpp holds at most {llama_baseline.LLAMA_MAX_SEQ} sequences"
    elif cfg.use_llama:
        if llama_baseline.available():
            lm = llama_baseline.LlamaMemory(n_cells, n_seqs + 1)
            for s in range(n_seqs):
                lm.load_blob(s, blobs[s] if s in blobs else kv.state_write(s))
        else:
            llama_note = "llama_cpp not installed"
    else:
        llama_note = "skipped (--no-llama)"
    ref = RefSide(n_cells, n_seqs, per_seq) if cfg.reference_fits(n_cells) else None
    ref_reps = 3 if cfg.quick else 5
    reps = cfg.reps
    slow_reps = max(3, reps // 5)  # for calls that cost milliseconds in llama.cpp

    def result(name, mine, theirs=None, refs=None, **kw) -> Result:
        r = Result(name, dict(params), *_stats(mine), **kw)
        if theirs is not None:
            r.llama_us, r.llama_min_us = _stats(theirs)
        elif not r.llama_note:
            r.llama_note = llama_note
        if refs is not None:
            r.reference_us = _stats(refs)[0]
        elif not r.reference_note:
            r.reference_note = f"not run above {65536 if cfg.quick else 262144} cells"
        return r

    rot = iter(range(1 << 30))

    def next_seq() -> int:
        return seqs[next(rot) % len(seqs)]

    # seq_pos_max: a query
    yield result("seq_pos_max",
                 sample_ns(lambda: kv.seq_pos_max(next_seq()), reps),
                 sample_ns(lambda: lm.seq_pos_max(next_seq()), reps) if lm else None,
                 sample_ns(lambda: ref.ref.seq_pos_max(next_seq()), ref_reps) if ref else None)

    # seq_add of a whole sequence (by +1, then back by -1: every call moves every cell)
    def adder(mem):
        state = {"d": 1}

        def call():
            mem.seq_add(0, -1, -1, state["d"])
            state["d"] = -state["d"]
        return call
    yield result("seq_add (whole seq)",
                 sample_ns(adder(kv), reps),
                 sample_ns(adder(lm), slow_reps) if lm else None,
                 sample_ns(adder(ref.ref), ref_reps) if ref else None)
    kv.init_update().apply()  # forget the (net zero) shift before the state workloads

    # seq_rm of a short tail: each call removes the last TAIL positions of the next sequence;
    # the sequences are restored afterwards (untimed)
    def tail_remover(mem):
        ends = {s: per_seq for s in seqs}

        def call():
            s = seqs[call.k % len(seqs)]
            call.k += 1
            ends[s] -= TAIL
            mem.seq_rm(s, ends[s], -1)
        call.k = 0
        return call
    n_tail = min(reps, len(seqs) * max(1, per_seq // TAIL - 1))
    mine = sample_ns(tail_remover(kv), n_tail)
    theirs = sample_ns(tail_remover(lm), n_tail) if lm else None
    refs = sample_ns(tail_remover(ref.ref), ref_reps) if ref else None
    for s in seqs:
        kv.state_read(blobs[s], s)
        if lm:
            lm.load_blob(s, blobs[s])
        if ref:
            ref.ref.seq_rm(s, -1, -1)
            ref.restore_seq(s)
    yield result(f"seq_rm (tail of {TAIL})", mine, theirs, refs)

    # seq_cp of a whole sequence into a spare id (removed again, untimed)
    def copier(mem):
        spare = n_seqs
        return (lambda: mem.seq_cp(0, spare, -1, -1)), (lambda: mem.seq_rm(spare, -1, -1))
    cp, undo = copier(kv)
    mine = sample_ns(cp, reps, after=undo)
    theirs = refs = None
    if lm:
        cp, undo = copier(lm)
        theirs = sample_ns(cp, slow_reps, after=undo)
    if ref:
        cp, undo = copier(ref.ref)
        refs = sample_ns(cp, ref_reps, after=undo)
    yield result("seq_cp (whole seq)", mine, theirs, refs)

    # seq_rm of a whole sequence (restored from its state bytes, untimed)
    def remover(mem, restore):
        seq = {"s": 0}

        def call():
            seq["s"] = next_seq()
            mem.seq_rm(seq["s"], -1, -1)
        return call, (lambda: restore(seq["s"]))
    call, undo = remover(kv, lambda s: kv.state_read(blobs[s], s))
    mine = sample_ns(call, reps, after=undo)
    theirs = refs = None
    if lm:
        call, undo = remover(lm, lambda s: lm.load_blob(s, blobs[s]))
        theirs = sample_ns(call, slow_reps, after=undo)
    if ref:
        call, undo = remover(ref.ref, ref.restore_seq)
        refs = sample_ns(call, ref_reps, after=undo)
    yield result("seq_rm (whole seq)", mine, theirs, refs)

    # state_write / state_read of one sequence; the copy ceiling moves the same bytes
    nbytes = len(blobs[0])
    src = np.frombuffer(blobs[0], np.uint8)
    dst = np.empty_like(src)
    copy = sample_ns(lambda: np.copyto(dst, src), reps)
    mine = sample_ns(lambda: kv.state_write(next_seq()), reps)
    theirs = refs = None
    if lm:
        import ctypes
        buf = (ctypes.c_uint8 * (lm.state_size(0) + 64))()
        theirs = sample_ns(lambda: lm.state_get(next_seq(), buf), slow_reps)
    if ref:
        refs = sample_ns(lambda: ref.ref.seq_state_cells(next_seq()), ref_reps)
    r = result("state_write (one seq)", mine, theirs, refs, nbytes=nbytes)
    r.copy_us = _stats(copy)[0]
    yield r

    # the same bytes into a reused buffer, as numpy.copyto writes into one (no fresh allocation)
    out = np.zeros(nbytes, np.uint8)
    mine = sample_ns(lambda: kv.state_write_into(out, next_seq()), reps)
    r = result("state_write_into (one seq)", mine, nbytes=nbytes,
               llama_note="state_get into a caller's buffer is the state_write row",
               reference_note="not modelled (bytes)")
    r.copy_us = _stats(copy)[0]
    yield r

    mine = sample_ns(lambda: kv.state_read(blobs[0], 0), reps)
    theirs = refs = None
    if lm:
        wrapped = llama_baseline.wrap_blob(0, blobs[0])
        import ctypes
        cbuf = (ctypes.c_uint8 * len(wrapped)).from_buffer_copy(wrapped)
        theirs = sample_ns(lambda: lm.state_set(0, cbuf, len(wrapped)), slow_reps)
    if ref and cfg.reference_copies_fit(n_cells):
        positions = list(range(per_seq))
        refs = sample_ns(lambda: ref.ref.seq_state_restore(positions, 0), 1)
    r = result("state_read (one seq)", mine, theirs, refs, nbytes=nbytes,
               reference_note="" if cfg.reference_copies_fit(n_cells) else "not run at this size")
    r.copy_us = _stats(copy)[0]
    yield r

    # seq_keep: drops every other sequence, so the cache is rebuilt before each call (untimed)
    keep_reps = 2 if cfg.quick else 4
    mine = []
    for _ in range(keep_reps):
        fresh, _ = filled_kv(n_cells, n_seqs)
        mine += sample_ns(lambda: fresh.seq_keep(0), 1)
        del fresh
    theirs = refs = None
    if lm:
        def refill_llama():
            lm.lib.llama_memory_clear(lm.mem, False)
            for s in range(n_seqs):
                lm.load_blob(s, blobs[s] if s in blobs else kv.state_write(s))
        theirs = sample_ns(lambda: lm.seq_keep(0), keep_reps, after=refill_llama)
    if ref:
        refs = sample_ns(lambda: ref.ref.seq_keep(0), 1)
    yield result("seq_keep", mine, theirs, refs)
    if lm:
        lm.close()


# ---------------------------------------------------------------------------------------------
# decode step and prefill (batch allocator + slot search + apply)
# ---------------------------------------------------------------------------------------------

def decode_step(n_cells: int, n_seqs: int, cfg: Config) -> Iterator[Result]:
    """Batch from numpy -> init_batch -> apply of one token per sequence, cache half full.
    Every (at most) 50 steps the new tokens are removed again (untimed), so the cache stays half full."""
    kv = KVCache(0, 8, 8, n_cells, n_seq_max=n_seqs)
    per_seq = n_cells // 2 // n_seqs
    n = per_seq * n_seqs
    for _ in kv.init_batch(Batch(token=np.zeros(n, np.int32), output=np.zeros(n, bool),
                                 seq_id=np.repeat(np.arange(n_seqs, dtype=np.int32), per_seq)), n):
        pass
    tokens = np.zeros(n_seqs, np.int32)
    seq_ids = np.arange(n_seqs, dtype=np.int32)
    steps = 300 if cfg.quick else 2000
    samples = []
    clock = time.perf_counter_ns

    burst_steps = max(1, min(50, (n_cells - n) // n_seqs - 1))  # the steps that fit before a reset

    def burst():
        for _ in range(burst_steps):
            t0 = clock()
            ctx = kv.init_batch(Batch(token=tokens, seq_id=seq_ids), 512)
            ctx.apply()
            samples.append(clock() - t0)
    while len(samples) < steps:
        sample_ns(burst, 1)  # (for its collector-off timing; the samples are per step)
        kv.seq_rm(-1, per_seq, -1)
    r = Result("decode step (1 token/seq)", {"n_cells": n_cells, "n_seqs": n_seqs}, *_stats(samples))
    stated = LLAMA_DECODE_STATED_US.get((n_seqs, n_cells))
    if stated is not None:
        r.llama_us, r.llama_note = stated, "stated (llama.cpp internal memory path, from the issue)"
    else:
        r.llama_note = "not measurable apart from model compute"
    if cfg.reference_copies_fit(n_cells):
        ref = RefSide(n_cells, n_seqs, per_seq).ref
        reps = 2 if cfg.quick else 5
        step_toks = lambda: [((s,), ref.seq_pos_max(s) + 1) for s in range(n_seqs)]  # noqa: E731
        refs = []
        for _ in range(reps):
            toks = step_toks()
            t0 = clock()
            ref.decode([toks])
            refs.append(clock() - t0)
        r.reference_us = _stats(refs)[0]
    else:
        r.reference_note = "not run at this size"
    yield r


def prefill(n_cells: int, cfg: Config, n_tokens: int = 4096, n_ubatch: int = 512) -> Iterator[Result]:
    """One sequence of 4096 tokens in micro-batches of 512 into an empty cache (all of the
    memory work of a prompt: allocator, slot search, apply, k/v indices of each micro-batch)."""
    kv = KVCache(0, 8, 8, n_cells, n_seq_max=1)
    tokens = np.zeros(n_tokens, np.int32)

    def run():
        for _ in kv.init_batch(Batch(token=tokens), n_ubatch):
            pass
    mine = sample_ns(run, 10 if cfg.quick else 40, after=lambda: kv.seq_rm(0, -1, -1))
    r = Result(f"prefill 1x{n_tokens} (ubatch {n_ubatch})", {"n_cells": n_cells, "n_seqs": 1}, *_stats(mine))
    r.llama_note = "not measurable apart from model compute"
    if cfg.reference_copies_fit(n_cells):
        ref = RefKV(n_cells, 1)
        ubs = [[((0,), p) for p in range(u, u + n_ubatch)] for u in range(0, n_tokens, n_ubatch)]
        refs = sample_ns(lambda: ref.decode(ubs), 1 if n_cells > 8192 else 2,
                         after=lambda: ref.seq_rm(0, -1, -1))
        r.reference_us = _stats(refs)[0]
    else:
        r.reference_note = "not run at this size"
    yield r


# ---------------------------------------------------------------------------------------------
# data-moving operations
# ---------------------------------------------------------------------------------------------

def mask_and_indices(cfg: Config, n_cells: int = 122880, n_used: int = 120000, n_seqs: int = 64) -> Iterator[Result]:
    """kq_mask + k_idxs + v_idxs of a 64-token micro-batch (one token per sequence) over 120k
    used cells. Reference: the mask built with numpy from the cells' positions and sequences;
    copy: numpy.copyto of a float32 array of the mask's size."""
    kv = KVCache(1, 8, 8, n_cells, n_seq_max=n_seqs)
    per_seq = n_used // n_seqs
    n = per_seq * n_seqs
    for _ in kv.init_batch(Batch(token=np.zeros(n, np.int32), output=np.zeros(n, bool),
                                 seq_id=np.repeat(np.arange(n_seqs, dtype=np.int32), per_seq)), n):
        pass
    ctx = kv.init_batch(Batch(token=np.zeros(n_seqs, np.int32), seq_id=np.arange(n_seqs, dtype=np.int32)), 512)
    ctx.apply()
    reps = 10 if cfg.quick else 40

    def mine_call():
        ctx.kq_mask()
        ctx.k_idxs()
        ctx.v_idxs()
    mine = sample_ns(mine_call, reps)
    mask = ctx.kq_mask()
    n_kv = mask.shape[1]
    cell_pos = np.full(n_kv, -1, np.int32)
    cell_seq = np.full(n_kv, -1, np.int32)
    cell_pos[:n] = np.tile(np.arange(per_seq, dtype=np.int32), n_seqs)
    cell_seq[:n] = np.repeat(np.arange(n_seqs, dtype=np.int32), per_seq)
    cell_pos[n:n + n_seqs] = per_seq
    cell_seq[n:n + n_seqs] = np.arange(n_seqs)
    tok_pos = np.full(n_seqs, per_seq, np.int32)
    tok_seq = np.arange(n_seqs, dtype=np.int32)

    def numpy_mask():
        visible = (cell_seq[None, :] == tok_seq[:, None]) & (cell_pos[None, :] <= tok_pos[:, None])
        return np.where(visible, np.float32(0), np.float32(-np.inf))
    expected = numpy_mask()
    ok = np.array_equal(np.asarray(mask).reshape(expected.shape), expected)
    refs = sample_ns(numpy_mask, reps)
    out = np.empty_like(expected)
    copy = sample_ns(lambda: np.copyto(out, expected), reps)
    r = Result("kq_mask + k/v idxs (64 tok)", {"n_cells": n_cells, "n_kv": n_kv, "n_seqs": n_seqs},
               *_stats(mine), llama_note="inside llama_decode's graph input", copy_us=_stats(copy)[0],
               nbytes=expected.nbytes, reference_us=_stats(refs)[0],
               reference_note="numpy mask" + ("" if ok else " (DIFFERS from llmem!)"))
    yield r


def state_bandwidth(cfg: Config, n_layer: int = 2, n_embd: int = 512, n_tokens: int = 4096) -> Iterator[Result]:
    """state_write / state_read of one sequence with rows of a real model's size (the seq-op
    workloads use 32-byte rows, where per-cell bookkeeping, not bandwidth, sets the cost).
    Copy: numpy.copyto of the blob's bytes."""
    kv = KVCache(n_layer, n_embd, n_embd, 2 * n_tokens, n_seq_max=2)
    for _ in kv.init_batch(Batch(token=np.zeros(n_tokens, np.int32), output=np.zeros(n_tokens, bool)), 512):
        pass
    blob = kv.state_write(0)
    src = np.frombuffer(blob, np.uint8)
    dst = np.empty_like(src)
    reps = 5 if cfg.quick else 20
    copy = _stats(sample_ns(lambda: np.copyto(dst, src), reps))[0]
    params = {"n_tokens": n_tokens, "n_layer": n_layer, "n_embd": n_embd}
    out = np.zeros(len(blob), np.uint8)
    for name, fn in (("state_write (one seq, big rows)", lambda: kv.state_write(0)),
                     ("state_write_into (one seq, big rows)", lambda: kv.state_write_into(out, 0)),
                     ("state_read (one seq, big rows)", lambda: kv.state_read(blob, 0))):
        yield Result(name, params, *_stats(sample_ns(fn, reps)), llama_note="see the seq-op rows",
                     copy_us=copy, nbytes=len(blob), reference_note="not modelled (bytes)")


def k_shift(cfg: Config) -> Iterator[Result]:
    """init_update().apply() after seq_add of every cell: RoPE re-rotation of every K row
    (n_rot 64 of head_dim 128, 4 layers x 1024 dims). Not a copy: the ceiling is numpy.copyto of
    the K buffers (same bytes read and written)."""
    n_cells = 4096 if cfg.quick else 16384
    for dtype, name in ((np.float16, "f16"), (np.float32, "f32"), ("bf16", "bf16")):
        kv = KVCache(4, 1024, 8, n_cells, dtype_k=dtype, rope=Rope(64, head_dim=128))
        rng = np.random.default_rng(0)
        for il in range(4):
            k = kv.k(il)
            k[...] = rng.integers(0x3000, 0x3c00, k.shape).astype(k.dtype) if name == "bf16" else \
                rng.standard_normal(k.shape).astype(k.dtype)
        for _ in kv.init_batch(Batch(token=np.zeros(n_cells, np.int32), output=np.zeros(n_cells, bool)), n_cells):
            pass

        def shift():
            kv.seq_add(0, -1, -1, 17)
            kv.init_update().apply()
        mine = sample_ns(shift, 3 if cfg.quick else 7)
        bufs = [kv.k(il) for il in range(4)]
        outs = [np.empty_like(b) for b in bufs]

        def copy_all():
            for o, b in zip(outs, bufs):
                np.copyto(o, b)
        copy = sample_ns(copy_all, 5)
        yield Result(f"K-shift ({name})", {"n_cells": n_cells, "n_layer": 4, "n_embd_k": 1024},
                     *_stats(mine), llama_note="inside llama_decode (graph)", copy_us=_stats(copy)[0],
                     nbytes=sum(b.nbytes for b in bufs), reference_note="not modelled (bytes)")


def cpy_kv(cfg: Config, n_tokens: int = 512, n_embd: int = 1024) -> Iterator[Result]:
    """cpy_k / cpy_v of a 512-token micro-batch of 1024 f16 per row into scattered cells.
    Reference: numpy fancy-index assignment of the rows; copy: numpy.copyto of the same bytes.
    cpy_v into a transposed V buffer is a transpose, not a copy."""
    kv = KVCache(1, n_embd, n_embd, 8192, dtype_k=np.float16, dtype_v=np.float16)
    ctx = kv.init_batch(Batch(token=np.zeros(n_tokens, np.int32)), n_tokens)
    ctx.apply()
    cur = np.random.default_rng(0).standard_normal((n_tokens, n_embd)).astype(np.float16)
    idxs = np.asarray(ctx.k_idxs()).astype(np.intp)
    out = np.empty_like(cur)
    reps = 20 if cfg.quick else 100
    copy = sample_ns(lambda: np.copyto(out, cur), reps)
    k_buf = kv.k(0)[0]  # (cells, n_embd) of the only stream
    v_view = kv.v(0)[0]  # transposed: (n_embd, cells)
    assert v_view.shape == (n_embd, 8192)
    ref_k = sample_ns(lambda: k_buf.__setitem__(idxs, cur), reps)

    def ref_v():
        v_view[:, idxs] = cur.T
    ref_vt = sample_ns(ref_v, reps)
    for name, fn, refs, note in (("cpy_k (512 x 1024 f16)", ctx.cpy_k, ref_k, "numpy scatter"),
                                 ("cpy_v transposed (512 x 1024 f16)", ctx.cpy_v, ref_vt, "numpy scatter")):
        mine = sample_ns(lambda: fn(0, cur), reps)
        yield Result(name, {"n_tokens": n_tokens, "n_embd": n_embd}, *_stats(mine),
                     llama_note="inside llama_decode (graph)", copy_us=_stats(copy)[0], nbytes=cur.nbytes,
                     reference_us=_stats(refs)[0], reference_note=note)


def recurrent_step(n_seqs: int, cfg: Config, n_layer: int = 2, n_embd_s: int = 1024) -> Iterator[Result]:
    """Recurrent decode step: Batch -> init_batch -> apply -> s_copy_all, and the state gather
    (get_s) + store (store_s) of every layer. Reference: RefRecurrent's slot search and s_copy
    plus numpy gather/store; copy: numpy.copyto of the gathered and stored bytes."""
    mem = RecurrentMemory(n_layer, 192, n_embd_s, mem_size=n_seqs, n_seq_max=n_seqs)
    balloc = llmem.BatchAllocator(n_seqs)
    token = np.zeros(n_seqs, np.int32)
    seq_id = np.arange(n_seqs, dtype=np.int32)
    new_s = np.ones((n_seqs, n_embd_s), np.float32)
    clock = time.perf_counter_ns
    steps = 200 if cfg.quick else 1000
    n_ubatch = max(512, n_seqs)  # every sequence in one micro-batch, as a server's decode step
    work, states, copy = [], [], []
    # the copy ceiling: numpy moving the same bytes between buffers of the same sizes, timed in
    # the same loop so that both see the same cache state (a separate warm loop keeps its few
    # megabytes in the L3 and measured twice the bandwidth a decode step can see)
    copy_bufs = [np.zeros((n_seqs, n_embd_s), np.float32) for _ in range(n_layer)]
    copy_out = [np.empty((n_seqs, n_embd_s), np.float32) for _ in range(n_layer)]
    for k in range(steps + 10):
        t0 = clock()
        balloc.init(Batch(token=token, seq_id=seq_id), mem)
        ctx = mem.init_batch(balloc, n_ubatch)
        ctx.apply()
        ctx.s_copy_all()
        t1 = clock()
        for il in range(n_layer):
            ctx.get_s(il)
            ctx.store_s(il, new_s)
        t2 = clock()
        for b, out in zip(copy_bufs, copy_out):
            np.copyto(out, b)
            np.copyto(b, new_s)
        t3 = clock()
        if k >= 10:  # the first steps give every sequence its cell
            work.append(t1 - t0)
            states.append(t2 - t1)
            copy.append(t3 - t2)
    total = [a + b for a, b in zip(work, states)]
    # the reference: slot search + s_copy in Python, states moved with numpy fancy indexing
    ref = RefRecurrent(n_seqs, n_seqs)
    bufs = [np.zeros((n_seqs, n_embd_s), np.float32) for _ in range(n_layer)]
    pos = {"p": 0}

    def ref_step():
        sets = [([s], 1, pos["p"]) for s in range(n_seqs)]
        pos["p"] += 1
        ref.find_slot(sets)
        src = np.array([ref.s_copy(k) for k in range(ref.n)], np.intp)
        for b in bufs:
            b[ref.head:ref.head + ref.n] = b[src]  # gather (the graph's view after the copy)
            b[ref.head:ref.head + n_seqs] = new_s  # store
    ref_step()
    refs = sample_ns(ref_step, 20 if cfg.quick else 100)
    nbytes = 2 * n_layer * n_seqs * n_embd_s * 4
    params = {"n_seqs": n_seqs, "n_layer": n_layer, "s_row_bytes": n_embd_s * 4}
    yield Result("recurrent step (memory + gather/store)", params, *_stats(total),
                 llama_note="inside llama_decode", reference_us=_stats(refs)[0],
                 extra={"memory_work_us": _stats(work)[0], "gather_store_us": _stats(states)[0]})
    yield Result("recurrent gather/store only", params, *_stats(states), llama_note="inside llama_decode (graph)",
                 copy_us=_stats(copy)[0], nbytes=nbytes, reference_note="see the step above")


# ---------------------------------------------------------------------------------------------
# the plan of a run
# ---------------------------------------------------------------------------------------------

SEQ_OP_NAMES = ("seq_pos_max", "seq_add (whole seq)", f"seq_rm (tail of {TAIL})", "seq_cp (whole seq)",
                "seq_rm (whole seq)", "state_write (one seq)", "state_write_into (one seq)", "state_read (one seq)",
                "seq_keep")


def plan(cfg: Config) -> list[tuple[str, str, Callable[[], Iterator[Result]]]]:
    """(group, label, thunk) for every task of the run, in order."""
    tasks: list = []
    if cfg.quick:
        seq_grid = [(4096, 64), (65536, 64), (1 << 20, 64), (1 << 20, 255)]
        decode_grid = [(4096, 64), (65536, 64), (1 << 20, 256)]
        prefill_sizes = [8192, 1 << 20]
        rec_seqs = [64, 256]
    else:
        sizes = [4096, 16384, 65536, 262144, 1 << 20]
        # 255 + the spare copy target is llama.cpp's limit; 1024 runs without that baseline
        seq_grid = [(c, s) for c in sizes for s in (1, 16, 64, 255, 1024) if c // 2 // s >= 2 * TAIL]
        decode_grid = [(c, s) for c in sizes for s in (1, 16, 64, 256, 1024)]
        prefill_sizes = [8192, 65536, 1 << 20]
        rec_seqs = [1, 16, 64, 256, 1024]
    for c, s in seq_grid:
        tasks.append(("seq_ops", f"sequence ops, {c} cells, {s} seqs", lambda c=c, s=s: seq_ops(c, s, cfg)))
    for c, s in decode_grid:
        tasks.append(("decode", f"decode step, {c} cells, {s} seqs", lambda c=c, s=s: decode_step(c, s, cfg)))
    for c in prefill_sizes:
        tasks.append(("prefill", f"prefill, {c} cells", lambda c=c: prefill(c, cfg)))
    for s in rec_seqs:
        tasks.append(("recurrent", f"recurrent step, {s} seqs", lambda s=s: recurrent_step(s, cfg)))
    tasks.append(("mask", "kq_mask over 120k cells", lambda: mask_and_indices(cfg)))
    tasks.append(("state", "state bandwidth", lambda: state_bandwidth(cfg)))
    tasks.append(("kshift", "K-shift", lambda: k_shift(cfg)))
    tasks.append(("cpy", "cpy_k / cpy_v", lambda: cpy_kv(cfg)))
    return tasks
