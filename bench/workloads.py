"""The workloads of ``python -m bench``: each measures llmem and, in the same run, its baselines.

Every workload function yields ``Result`` records. Baselines:

* ``llama`` - llama.cpp itself: the sequence operations through llama-cpp-python's C API
  (``llama_baseline.py``); the decode step, the prefill, the mask and the recurrent step through
  llama.cpp's own memory classes driven from C++ (``llama_driver.py`` / ``llama_driver.cpp``: the
  memory part of llama_decode without the model), timed inside C++ and interleaved with llmem.
  Where llama.cpp is not measured the row says why; no figure is quoted.
* ``reference`` - the pure-Python reference implementations of the tests
  (``tests/python/reference``), or a plain numpy version where those do not model bytes.
* ``copy`` - ``numpy.copyto`` of the same bytes, the bandwidth ceiling of a data-moving operation.

Times are the median of single calls (perf_counter_ns from Python; for the C API rows llmem and
llama.cpp both pay one foreign call, the driver rows time llama.cpp without one), minima are kept in
the JSON.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

import llmem
from llmem import Batch, KVCache, RecurrentMemory, Rope, SWAType

from . import llama_baseline, llama_driver
from ._timing import median_min_us, sample_ns

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
from reference.ref_kv import RefKV  # noqa: E402
from reference.ref_recurrent import RefRecurrent  # noqa: E402

TAIL = 4  # tokens in "a short tail"


@dataclass
class Result:
    workload: str
    params: dict
    llmem_us: float
    llmem_min_us: float
    llama_us: Optional[float] = None
    llama_min_us: Optional[float] = None
    llama_note: str = ""  # why there is no llama.cpp figure (or what it covers)
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
                 v_trans=False, rope=Rope(llama_baseline.N_EMBD, head_dim=llama_baseline.N_EMBD),
                 compat="b11312")  # llama-cpp-python 0.3.36 reads state format 3
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
    pos_max_mine = sample_ns(lambda: kv.seq_pos_max(next_seq()), reps)
    yield result("seq_pos_max",
                 pos_max_mine,
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
    tail_mine = mine
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

    # llama_kv_cache's own seq_pos_max and tail seq_rm, timed inside C++ (no foreign call): what a
    # C API for these calls could at best reach; llmem's column is its Python call of the rows above
    note = driver_note(cfg)
    if not note and n_seqs + 1 > llama_baseline.LLAMA_MAX_SEQ:
        note = f"llama.cpp holds at most {llama_baseline.LLAMA_MAX_SEQ} sequences"
    if not note:
        _, lk, _, _ = twin_caches("unified", n_cells, n_seqs, cfg, n_seq_max=n_seqs + 1, per_seq=per_seq,
                                  with_llmem=False)
        yield result("seq_pos_max (llama.cpp inside C++)", pos_max_mine, lk.time_seq_pos_max(seqs, reps).tolist(),
                     reference_note="see seq_pos_max")
        yield result(f"seq_rm (tail of {TAIL}, llama.cpp inside C++)", tail_mine,
                     lk.time_seq_rm_tail(seqs, TAIL, n_tail).tolist(), reference_note=f"see seq_rm (tail of {TAIL})")
        lk.close()


# ---------------------------------------------------------------------------------------------
# decode step and prefill (batch allocator + slot search + apply)
# ---------------------------------------------------------------------------------------------

SWA_TYPES = {"none": SWAType.NONE, "standard": SWAType.STANDARD, "chunked": SWAType.CHUNKED,
             "symmetric": SWAType.SYMMETRIC}


class DecodeSide:
    """llmem's half of a decode-step comparison: the step (``KVCache.decode_step`` where the tree
    has it, else Batch + ``init_batch`` + ``apply``), its k/v indices, and the mask (written into
    a reused buffer with ``kq_mask(out=...)`` where the tree has it)."""

    def __init__(self, kv: KVCache, seq_ids: np.ndarray, n_ubatch: int) -> None:
        self.kv = kv
        self.seq_ids = seq_ids
        self.tokens = np.zeros(len(seq_ids), np.int32)
        self.outputs = np.ones(len(seq_ids), bool)  # every sequence samples its next token
        self.n_ubatch = n_ubatch
        self.one_call = getattr(kv, "decode_step", None)
        self.mask_out: Optional[bool] = None  # whether kq_mask(out=) works; None: not tried yet
        self.bufs: dict = {}

    @property
    def api(self) -> str:
        step = "decode_step" if self.one_call is not None else "init_batch+apply"
        mask = {True: "kq_mask(out=)", False: "kq_mask()", None: "-"}[self.mask_out]
        return f"{step}, {mask}"

    def step(self):
        if self.one_call is not None:
            ctx = self.one_call(self.seq_ids, self.tokens)
        else:
            ctx = self.kv.init_batch(Batch(token=self.tokens, seq_id=self.seq_ids, output=self.outputs),
                                     self.n_ubatch)
            ctx.apply()
        ctx.k_idxs()
        ctx.v_idxs()
        return ctx

    def mask(self, ctx, causal: bool = True):
        if self.mask_out is False:
            return ctx.kq_mask(causal)
        shape = (len(self.seq_ids), ctx.n_kv)
        buf = self.bufs.get(shape)
        if buf is None:
            buf = self.bufs[shape] = np.empty(shape, np.float32)
        if self.mask_out:
            return ctx.kq_mask(causal, out=buf)
        try:
            out = ctx.kq_mask(causal, out=buf)
            self.mask_out = True
            return out
        except (TypeError, ValueError):  # a tree without out= (or with another contract for it)
            self.mask_out = False
            return ctx.kq_mask(causal)

    def mask_f16(self, ctx):
        """The f16 mask (llama.cpp's under flash attention) into a reused buffer, where the tree's
        kq_mask takes ``dtype`` and ``out``; None where it does not."""
        shape = (len(self.seq_ids), ctx.n_kv)
        key = ("f16",) + shape
        buf = self.bufs.get(key)
        if buf is None:
            buf = self.bufs[key] = np.empty(shape, np.float16)
        try:
            return ctx.kq_mask(out=buf, dtype=np.float16)
        except (TypeError, ValueError):
            return None

    def step_and_mask(self):
        ctx = self.step()
        self.mask(ctx)
        return ctx


_driver_models: dict = {}


def driver_note(cfg: Config) -> str:
    """Why llama.cpp's memory classes cannot be driven in this run ("" when they can)."""
    if not cfg.use_llama:
        return "skipped (--no-llama)"
    if not llama_driver.available():
        return "llama.cpp driver unavailable: " + llama_driver.unavailable_reason()
    return ""


def driver_model(kind: str = "kv"):
    """llama.cpp's model object of the bench's tiny GGUF (hyperparameters and vocabulary); the
    recurrent driver gets its own, which it gives a recurrent state."""
    if kind not in _driver_models:
        _driver_models[kind] = llama_driver.Model(llama_baseline.model_path())
    return _driver_models[kind]


def twin_caches(layout: str, n_cells: int, n_seqs: int, cfg: Config, n_seq_max: Optional[int] = None,
                per_seq: Optional[int] = None, v_trans: bool = False, with_llmem: bool = True,
                swa: str = "none", n_swa: int = 0):
    """llmem's KVCache and (when the driver is available) llama.cpp's llama_kv_cache of the same
    shape, filled by the same batch: ``per_seq`` tokens of every sequence (default: half the
    cache), one micro-batch. ``n_cells`` is the total: per stream ``n_cells / n_seqs`` cells when
    ``layout`` is "streams" (one stream per sequence, llama.cpp's kv_unified = false). ``swa``
    ("standard", "chunked", "symmetric") with ``n_swa`` makes both sliding-window caches.
    Returns (kv, llama kv or None, per_seq, note)."""
    unified = layout == "unified"
    n_seq_max = n_seqs if n_seq_max is None else n_seq_max
    kv_size = n_cells if unified else n_cells // n_seq_max
    if per_seq is None:
        per_seq = n_cells // 2 // n_seqs if unified else kv_size // 2
    n = per_seq * n_seqs
    seq_of = np.repeat(np.arange(n_seqs, dtype=np.int32), per_seq)
    pos_of = np.tile(np.arange(per_seq, dtype=np.int32), n_seqs)
    kv = None
    if with_llmem:
        kv = KVCache(1, llama_baseline.N_EMBD, llama_baseline.N_EMBD, kv_size, n_seq_max=n_seq_max,
                     unified=unified, v_trans=v_trans, compat="b11312", n_swa=n_swa, swa_type=SWA_TYPES[swa])
        for _ in kv.init_batch(Batch(token=np.zeros(n, np.int32), seq_id=seq_of, pos=pos_of,
                                     output=np.zeros(n, bool)), n):
            pass
    note = driver_note(cfg)
    lk = None
    if not note:
        lk = llama_driver.KV(driver_model(), kv_size, n_seq_max, unified=unified, n_ubatch=max(512, n_seqs),
                             n_tokens_max=n, v_trans=v_trans, n_swa=n_swa, swa_type=int(SWA_TYPES[swa]))
        lk.decode(seq_of, pos_of, n_ubatch=n)
    return kv, lk, per_seq, note


def masks_agree(side: DecodeSide, lk, causal: bool = True) -> tuple[bool, str]:
    """One decode step in each, then llama.cpp's mask (copied out of its graph input) against
    llmem's, and the k indices; both steps are left in the caches."""
    ctx = side.step()
    lk.decode_steps(side.seq_ids, 1, 0)
    mine = np.asarray(side.mask(ctx, causal), np.float32)
    theirs = lk.mask(causal)
    if mine.shape != theirs.shape and mine.size == theirs.size:
        mine = mine.reshape(theirs.shape)
    if mine.shape != theirs.shape:
        return False, f"mask shapes differ: llmem {mine.shape}, llama.cpp {theirs.shape}"
    if not np.array_equal(mine, theirs):
        return False, f"masks differ in {int(np.count_nonzero(mine != theirs))} places"
    if not np.array_equal(np.asarray(ctx.k_idxs()), lk.k_idxs()):
        return False, "k indices differ"
    return True, ""


def decode_rows(layout: str, n_cells: int, n_seqs: int, cfg: Config, with_mask: bool = True) -> Iterator[Result]:
    """The decode step of one token per sequence on a half-full cache, llmem and llama.cpp's own
    memory classes (llama_driver.cpp: llama_batch_ext, llama_batch_allocr, llama_kv_cache) side by
    side, after checking that they hold the same cells and give the same mask. Timed in rounds,
    llmem's burst of steps then llama.cpp's, so that both see the same phases of the host:

    * the step: batch, allocator init, init_batch, apply, k/v indices (llama.cpp's
      set_input_k_idxs / set_input_v_idxs);
    * the mask (f32) of the step's micro-batch, set again on the same step;
    * the step plus its mask.

    Every burst's tokens are removed again (untimed), so the cache stays half full. llmem is timed
    from Python (perf_counter_ns around each call), llama.cpp inside C++ (no foreign call)."""
    params = {"layout": layout, "n_cells": n_cells, "n_seqs": n_seqs}
    n_ubatch = max(512, n_seqs)
    kv, lk, per_seq, note = twin_caches(layout, n_cells, n_seqs, cfg)
    seq_ids = np.arange(n_seqs, dtype=np.int32)
    side = DecodeSide(kv, seq_ids, n_ubatch)
    if lk is not None:
        ok, why = masks_agree(side, lk)
        lk.seq_rm(-1, per_seq, -1)
        if not ok:
            note, lk = f"not timed: {why}", None
    else:
        side.mask(side.step())  # (learns which mask call the tree has)
    kv.seq_rm(-1, per_seq, -1)
    free = (n_cells - per_seq * n_seqs) // n_seqs if layout == "unified" else n_cells // n_seqs - per_seq
    burst = max(1, min(25, free - 1))
    rounds = 4 if cfg.quick else 16
    mask_bytes = 4 * n_seqs * (per_seq + 256 + burst)
    mask_bytes *= n_seqs if layout == "unified" else 1
    big_mask = cfg.quick and mask_bytes > (64 << 20)
    clock = time.perf_counter_ns

    def llmem_burst(fn, out):
        def run():
            for _ in range(burst):
                t0 = clock()
                fn()
                out.append(clock() - t0)
        sample_ns(run, 1)  # (for its collector-off timing; the samples are per step)
        kv.seq_rm(-1, per_seq, -1)

    def llama_burst(mask, out):
        out.extend(lk.decode_steps(seq_ids, burst, mask).tolist())
        lk.seq_rm(-1, per_seq, -1)

    kinds = [("decode step (1 token/seq)", side.step, 0)]
    if with_mask and not big_mask:
        kinds.append(("decode step + kq_mask", side.step_and_mask, 1))
    for name, fn, mask in kinds:
        mine, theirs = [], []
        for _ in range(rounds):
            llmem_burst(fn, mine)
            if lk is not None:
                llama_burst(mask, theirs)
        r = Result(name, dict(params), *_stats(mine), extra={"llmem_api": side.api})
        if lk is not None:
            r.llama_us, r.llama_min_us = _stats(theirs)
        else:
            r.llama_note = note
        if mask == 0 and layout == "unified" and cfg.reference_copies_fit(n_cells):
            ref = RefSide(n_cells, n_seqs, per_seq).ref
            refs = []
            for _ in range(2 if cfg.quick else 5):
                toks = [((s,), ref.seq_pos_max(s) + 1) for s in range(n_seqs)]
                t0 = clock()
                ref.decode([toks])
                refs.append(clock() - t0)
            r.reference_us = _stats(refs)[0]
        else:
            r.reference_note = "not run at this size"
        yield r
    if not with_mask:
        return
    name = "kq_mask f32 (decode step)"
    if big_mask:
        for skipped in ("decode step + kq_mask", name):
            yield Result(skipped, dict(params), None, None,
                         llama_note=f"not run in quick mode: a {mask_bytes >> 20} MB mask (run --full)",
                         reference_note="-")
        return
    # the mask alone, set again and again on one applied step of each
    ctx = side.step()
    if lk is not None:
        lk.decode_steps(seq_ids, 1, 0)
    reps = 10 if cfg.quick else 40
    mine, theirs = [], []
    for _ in range(rounds):
        mine += sample_ns(lambda: side.mask(ctx), reps)
        if lk is not None:
            theirs += lk.mask_reps(reps).tolist()
    r = Result(name, dict(params), *_stats(mine), extra={"llmem_api": side.api},
               reference_note="see the kq_mask row of the mask group")
    if lk is not None:
        r.llama_us, r.llama_min_us = _stats(theirs)
    else:
        r.llama_note = note
    yield r
    # the f16 mask, where the tree writes one (llama.cpp's mask type under flash attention),
    # checked equal to llama.cpp's f16 mask first
    if side.mask_f16(ctx) is None:
        return
    if lk is not None:
        mine16 = np.asarray(side.mask_f16(ctx)).reshape(-1, ctx.n_kv)
        if not np.array_equal(mine16.astype(np.float32), lk.mask()):
            note, lk = "not timed: the f16 masks differ", None
    mine, theirs = [], []
    for _ in range(rounds):
        mine += sample_ns(lambda: side.mask_f16(ctx), reps)
        if lk is not None:
            theirs += lk.mask_reps(reps, f16=True).tolist()
    r = Result("kq_mask f16 (decode step)", dict(params), *_stats(mine), extra={"llmem_api": side.api},
               reference_note="-")
    if lk is not None:
        r.llama_us, r.llama_min_us = _stats(theirs)
    else:
        r.llama_note = note
    yield r


def mask_rows(layout: str, n_cells: int, n_seqs: int, cfg: Config, swa: str = "none", n_swa: int = 0,
              causal: bool = True) -> Iterator[Result]:
    """The f32 mask of a decode step's micro-batch (one token per sequence, half-full cache) in the
    configurations the decode rows leave out: sliding-window caches (standard, chunked, symmetric)
    and the non-causal mask (``causal_attn`` false, as for an embedding model), next to llama.cpp's
    ``set_input_kq_mask`` on its own cache holding the same cells (same shape and type, a host
    buffer; the masks checked equal first). Timed in interleaved rounds of repeated calls on one
    applied step, as the ``kq_mask f32 (decode step)`` rows."""
    params = {"layout": layout, "n_cells": n_cells, "n_seqs": n_seqs}
    if swa != "none":
        params["swa"] = f"{swa} {n_swa}"
    if not causal:
        params["causal"] = "no"
    kv, lk, per_seq, note = twin_caches(layout, n_cells, n_seqs, cfg, swa=swa, n_swa=n_swa)
    seq_ids = np.arange(n_seqs, dtype=np.int32)
    side = DecodeSide(kv, seq_ids, max(512, n_seqs))
    if lk is not None:
        ok, why = masks_agree(side, lk, causal)
        if not ok:
            note, lk = f"not timed: {why}", None
    ctx = side.step() if lk is None else None
    if ctx is None:  # masks_agree left one applied step in each cache
        kv.seq_rm(-1, per_seq, -1)
        lk.seq_rm(-1, per_seq, -1)
        ctx = side.step()
        lk.decode_steps(seq_ids, 1, 0)
    reps = 10 if cfg.quick else 40
    mine, theirs = [], []
    for _ in range(4 if cfg.quick else 16):
        mine += sample_ns(lambda: side.mask(ctx, causal), reps)
        if lk is not None:
            theirs += lk.mask_reps(reps, causal=causal).tolist()
    r = Result("kq_mask f32 (decode step)", params, *_stats(mine), extra={"llmem_api": side.api},
               reference_note="see the kq_mask row of the mask group")
    if lk is not None:
        r.llama_us, r.llama_min_us = _stats(theirs)
        lk.close()
    else:
        r.llama_note = note
    yield r


def prefill(n_cells: int, cfg: Config, n_tokens: int = 4096, n_ubatch: int = 512) -> Iterator[Result]:
    """One sequence of 4096 tokens in micro-batches of 512 into an empty cache (all of the
    memory work of a prompt: allocator, slot search, apply, k/v indices of each micro-batch)."""
    kv = KVCache(0, 8, 8, n_cells, n_seq_max=1)
    tokens = np.zeros(n_tokens, np.int32)

    def run():
        for _ in kv.init_batch(Batch(token=tokens), n_ubatch):
            pass
    note = driver_note(cfg)
    lk = None
    if not note:
        lk = llama_driver.KV(driver_model(), n_cells, 1, unified=True, n_ubatch=n_ubatch, n_tokens_max=n_tokens)
    reps = 10 if cfg.quick else 40
    mine, theirs = [], []
    for _ in range(2 if cfg.quick else 4):  # interleaved rounds
        mine += sample_ns(run, reps // 2, after=lambda: kv.seq_rm(0, -1, -1))
        if lk is not None:
            theirs += lk.time_prefill(n_tokens, n_ubatch, reps // 2).tolist()
    r = Result(f"prefill 1x{n_tokens} (ubatch {n_ubatch})", {"n_cells": n_cells, "n_seqs": 1}, *_stats(mine))
    if lk is not None:
        r.llama_us, r.llama_min_us = _stats(theirs)
        lk.close()
    else:
        r.llama_note = note
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
    used cells, V transposed (as without flash attention: v_idxs holds one index per value).
    llama.cpp: its llama_kv_cache holding the same cells, after the same step, its graph inputs
    (set_input_kq_mask, set_input_k_idxs, set_input_v_idxs), the mask checked equal first.
    Reference: the mask built with numpy from the cells' positions and sequences; copy:
    numpy.copyto of a float32 array of the mask's size."""
    per_seq = n_used // n_seqs
    n = per_seq * n_seqs
    kv, lk, _, note = twin_caches("unified", n_cells, n_seqs, cfg, per_seq=per_seq, v_trans=True)
    seq_ids = np.arange(n_seqs, dtype=np.int32)
    ctx = kv.init_batch(Batch(token=np.zeros(n_seqs, np.int32), seq_id=seq_ids), 512)
    ctx.apply()
    reps = 10 if cfg.quick else 40

    def mine_call():
        ctx.kq_mask()
        ctx.k_idxs()
        ctx.v_idxs()
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
    if lk is not None:
        lk.decode_steps(seq_ids, 1, 0)
        theirs_mask = lk.mask()
        if theirs_mask.shape != expected.shape or not np.array_equal(theirs_mask, expected):
            note, lk = "not timed: llama.cpp's mask differs from llmem's", None
        elif not np.array_equal(lk.v_idxs(), np.asarray(ctx.v_idxs())):
            note, lk = "not timed: llama.cpp's v indices differ from llmem's", None
    mine, theirs, refs, copy = [], [], [], []
    out = np.empty_like(expected)
    for _ in range(2):  # interleaved rounds
        mine += sample_ns(mine_call, reps // 2)
        if lk is not None:
            theirs += lk.mask_reps(reps // 2, with_idxs=True).tolist()
        refs += sample_ns(numpy_mask, reps // 2)
        copy += sample_ns(lambda: np.copyto(out, expected), reps // 2)
    r = Result("kq_mask + k/v idxs (64 tok)", {"n_cells": n_cells, "n_kv": n_kv, "n_seqs": n_seqs},
               *_stats(mine), copy_us=_stats(copy)[0],
               nbytes=expected.nbytes, reference_us=_stats(refs)[0],
               reference_note="numpy mask" + ("" if ok else " (DIFFERS from llmem!)"))
    if lk is not None:
        r.llama_us, r.llama_min_us = _stats(theirs)
    else:
        r.llama_note = note
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
    # llama.cpp's llama_memory_recurrent driven from C++ with the same step, in bursts between
    # llmem's steps (interleaved): batch, allocator init, init_batch, apply, s_copy of every state
    note = driver_note(cfg)
    lrs = None
    if not note:
        lrs = llama_driver.Recurrent(driver_model("recurrent"), n_seqs, n_seqs, n_ubatch)
        lrs.steps(seq_id, 10)  # the first steps give every sequence its cell
    theirs: list = []
    burst = 25
    for k in range(steps + 10):
        if lrs is not None and k >= 10 and (k - 10) % burst == 0:
            theirs += lrs.steps(seq_id, burst).tolist()
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
    mem = Result("recurrent step (memory only)", params, *_stats(work), reference_note="see the step below",
                 extra={"what": "Batch, allocator init, init_batch, apply, s_copy_all"})
    if lrs is not None:
        mem.llama_us, mem.llama_min_us = _stats(theirs)
        lrs.close()
    else:
        mem.llama_note = note
    yield mem
    yield Result("recurrent step (memory + gather/store)", params, *_stats(total),
                 llama_note="the gather/store runs in llama_decode's graph", reference_us=_stats(refs)[0],
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
        # issue 13's rows: unified 64k at 1/4/64 sequences, per-sequence streams at 64k/64 and
        # 1M/256, the 1M/256 unified step; 4k/64 for the Python reference
        decode_grid = [("unified", 4096, 64), ("unified", 65536, 1), ("unified", 65536, 4),
                       ("unified", 65536, 64), ("streams", 65536, 64), ("unified", 1 << 20, 256),
                       ("streams", 1 << 20, 256)]
        prefill_sizes = [8192, 1 << 20]
        rec_seqs = [64, 256]
    else:
        sizes = [4096, 16384, 65536, 262144, 1 << 20]
        # 255 + the spare copy target is llama.cpp's limit; 1024 runs without that baseline
        seq_grid = [(c, s) for c in sizes for s in (1, 16, 64, 255, 1024) if c // 2 // s >= 2 * TAIL]
        # llama.cpp holds at most 256 sequences
        decode_grid = [(lay, c, s) for lay in ("unified", "streams") for c in (4096, 65536, 1 << 20)
                       for s in (1, 4, 64, 256)]
        prefill_sizes = [8192, 65536, 1 << 20]
        rec_seqs = [1, 16, 64, 256, 1024]
    for c, s in seq_grid:
        tasks.append(("seq_ops", f"sequence ops, {c} cells, {s} seqs", lambda c=c, s=s: seq_ops(c, s, cfg)))
    for lay, c, s in decode_grid:
        tasks.append(("decode", f"decode step, {lay}, {c} cells, {s} seqs",
                      lambda lay=lay, c=c, s=s: decode_rows(lay, c, s, cfg)))
    # the mask in the configurations the decode rows leave out: sliding windows, non-causal, 4k
    mask_grid = [("unified", 65536, 1, "standard", 4096, True), ("unified", 65536, 1, "chunked", 4096, True),
                 ("unified", 65536, 1, "symmetric", 4096, True), ("unified", 65536, 64, "standard", 4096, True),
                 ("streams", 65536, 64, "chunked", 4096, True), ("unified", 65536, 1, "none", 0, False),
                 ("unified", 65536, 64, "none", 0, False), ("unified", 4096, 1, "none", 0, True),
                 ("unified", 4096, 4, "standard", 1024, True)]
    if not cfg.quick:
        mask_grid += [("unified", 1 << 20, 1, "chunked", 4096, True), ("unified", 65536, 4, "symmetric", 4096, False),
                      ("streams", 1 << 20, 256, "standard", 4096, True), ("unified", 65536, 256, "none", 0, False)]
    for lay, c, s, swa, n_swa, causal in mask_grid:
        tasks.append(("mask", f"kq_mask, {lay}, {c} cells, {s} seqs, swa {swa}, causal {causal}",
                      lambda lay=lay, c=c, s=s, swa=swa, n_swa=n_swa, causal=causal:
                      mask_rows(lay, c, s, cfg, swa, n_swa, causal)))
    for c in prefill_sizes:
        tasks.append(("prefill", f"prefill, {c} cells", lambda c=c: prefill(c, cfg)))
    for s in rec_seqs:
        tasks.append(("recurrent", f"recurrent step, {s} seqs", lambda s=s: recurrent_step(s, cfg)))
    tasks.append(("mask", "kq_mask over 120k cells", lambda: mask_and_indices(cfg)))
    tasks.append(("state", "state bandwidth", lambda: state_bandwidth(cfg)))
    tasks.append(("kshift", "K-shift", lambda: k_shift(cfg)))
    tasks.append(("cpy", "cpy_k / cpy_v", lambda: cpy_kv(cfg)))
    return tasks
