# cython: language_level=3, boundscheck=False, wraparound=False
"""A Cython consumer of llmem's C API, compiled by tests/python/test_capi.py (and by the bench).

It is what a server written in Cython does: take the handle of a memory built in Python, then
drive it without the GIL. `Memory`/`Context` wrap each C function for the tests; `run_workload`
is a continuous-batching loop that runs entirely in a nogil block; the `time_*` functions time
single calls for bench/bench_capi.py.
"""

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

import numpy as np

from llmem cimport capi

cdef const capi.llmem_capi* api = capi.import_capi()

ABI_VERSION = api.abi_version
LLMEM_VERSION = api.llmem_version.decode()
STRUCT_SIZE = api.struct_size

cdef enum:
    ERR_LEN = 512


class CapiError(Exception):
    """A non-zero return code of the C API, with its message."""

    def __init__(self, rc, message):
        super().__init__(f"[{rc}] {message}")
        self.rc = rc
        self.message = message


cdef int check(int rc, const char* err) except -1:
    if rc != capi.LLMEM_OK:
        raise CapiError(rc, err.decode("utf-8", "replace"))
    return 0


cdef class Memory:
    """A handle on a Python memory (the handle holds a reference to it)."""

    cdef capi.llmem_memory* mem
    cdef char err[ERR_LEN]
    cdef public object py_memory

    def __cinit__(self, py_memory):
        self.mem = NULL
        check(api.memory_get(<void*>py_memory, &self.mem, self.err, ERR_LEN), self.err)
        self.py_memory = py_memory

    def __dealloc__(self):
        if self.mem != NULL:
            api.memory_release(self.mem)

    def info(self):
        cdef capi.llmem_memory_info i
        api.memory_info(self.mem, &i)
        return dict(kind=i.kind, n_seq_max=i.n_seq_max, kv_size=i.kv_size, swa_size=i.swa_size,
                    n_stream=i.n_stream, rs_size=i.rs_size, n_rs_seq=i.n_rs_seq, n_layer=i.n_layer)

    def layer_kv(self, int32_t il):
        cdef int32_t part = 0
        cdef void* k = NULL
        cdef void* v = NULL
        cdef size_t kb = 0, vb = 0
        check(api.layer_kv(self.mem, il, &part, &k, &kb, &v, &vb, self.err, ERR_LEN), self.err)
        return part, <size_t>k, kb, <size_t>v, vb

    def layer_rs(self, int32_t il):
        cdef void* r = NULL
        cdef void* s = NULL
        cdef size_t rb = 0, sb = 0
        check(api.layer_rs(self.mem, il, &r, &rb, &s, &sb, self.err, ERR_LEN), self.err)
        return <size_t>r, rb, <size_t>s, sb

    def lock(self):
        with nogil:
            api.lock(self.mem)

    def try_lock(self):
        return api.try_lock(self.mem) == 1

    def unlock(self):
        cdef int rc
        with nogil:
            rc = api.unlock(self.mem)
        if rc != capi.LLMEM_OK:
            raise CapiError(rc, "unlock: this thread does not hold the lock")

    def clear(self, bint data=True):
        cdef int rc
        with nogil:
            rc = api.clear(self.mem, data, self.err, ERR_LEN)
        check(rc, self.err)

    def seq_rm(self, int32_t seq, int32_t p0=-1, int32_t p1=-1):
        cdef int rc, removed = 0
        with nogil:
            rc = api.seq_rm(self.mem, seq, p0, p1, &removed, self.err, ERR_LEN)
        check(rc, self.err)
        return bool(removed)

    def seq_cp(self, int32_t src, int32_t dst, int32_t p0=-1, int32_t p1=-1):
        cdef int rc
        with nogil:
            rc = api.seq_cp(self.mem, src, dst, p0, p1, self.err, ERR_LEN)
        check(rc, self.err)

    def seq_keep(self, int32_t seq):
        cdef int rc
        with nogil:
            rc = api.seq_keep(self.mem, seq, self.err, ERR_LEN)
        check(rc, self.err)

    def seq_add(self, int32_t seq, int32_t p0, int32_t p1, int32_t shift):
        cdef int rc
        with nogil:
            rc = api.seq_add(self.mem, seq, p0, p1, shift, self.err, ERR_LEN)
        check(rc, self.err)

    def seq_div(self, int32_t seq, int32_t p0, int32_t p1, int32_t d):
        cdef int rc
        with nogil:
            rc = api.seq_div(self.mem, seq, p0, p1, d, self.err, ERR_LEN)
        check(rc, self.err)

    def seq_pos_min(self, int32_t seq):
        cdef int rc
        cdef int32_t out = 0
        with nogil:
            rc = api.seq_pos_min(self.mem, seq, &out, self.err, ERR_LEN)
        check(rc, self.err)
        return out

    def seq_pos_max(self, int32_t seq):
        cdef int rc
        cdef int32_t out = 0
        with nogil:
            rc = api.seq_pos_max(self.mem, seq, &out, self.err, ERR_LEN)
        check(rc, self.err)
        return out

    def update(self):
        cdef int rc, applied = 0
        with nogil:
            rc = api.update(self.mem, &applied, self.err, ERR_LEN)
        check(rc, self.err)
        return bool(applied)

    def init_batch(self, token, seq_id, pos=None, output=None, uint32_t n_ubatch=512, bint embd_all=False):
        """(status, Context or None) for a batch of one sequence id per token."""
        cdef int32_t[::1] tok = np.ascontiguousarray(token, np.int32)
        cdef int32_t[::1] sid = np.ascontiguousarray(seq_id, np.int32)
        cdef int32_t[::1] ps
        cdef int8_t[::1] out
        cdef capi.llmem_batch b
        memset(&b, 0, sizeof(b))
        b.n_tokens = <uint32_t>tok.shape[0]
        if sid.shape[0] != tok.shape[0]:
            raise ValueError("token and seq_id differ in length")
        if tok.shape[0] > 0:
            b.token = &tok[0]
            b.seq_id = &sid[0]
        if pos is not None:
            ps = np.ascontiguousarray(pos, np.int32)
            b.pos = &ps[0]
        if output is not None:
            out = np.ascontiguousarray(output, np.int8)
            b.output = &out[0]
        cdef capi.llmem_context* ctx = NULL
        cdef int32_t status = -1
        cdef int rc
        with nogil:
            rc = api.init_batch(self.mem, &b, n_ubatch, embd_all, &ctx, &status, self.err, ERR_LEN)
        check(rc, self.err)
        return status, (Context.wrap(self, ctx) if ctx != NULL else None)

    def decode_step(self, seq_ids, token=None, bint keep_context=True, uint32_t n_ubatch=0):
        """(llmem_step as a dict, k_idxs int64[n], pos int32[n], Context or None)."""
        cdef int32_t[::1] sid = np.ascontiguousarray(seq_ids, np.int32)
        cdef uint32_t n = <uint32_t>sid.shape[0]
        cdef int32_t[::1] tok
        cdef const int32_t* tp = NULL
        if token is not None:
            tok = np.ascontiguousarray(token, np.int32)
            tp = &tok[0]
        k_idxs = np.empty(max(n, 1), np.int64)
        pos = np.empty(max(n, 1), np.int32)
        cdef int64_t[::1] kv = k_idxs
        cdef int32_t[::1] pv = pos
        cdef capi.llmem_step step
        cdef capi.llmem_context* ctx = NULL
        cdef int rc
        cdef const int32_t* sp = &sid[0] if n > 0 else NULL
        with nogil:
            rc = api.decode_step(self.mem, sp, tp, n, n_ubatch, &step, &kv[0], &pv[0],
                                 &ctx if keep_context else NULL, self.err, ERR_LEN)
        check(rc, self.err)
        info = dict(status=step.status, n_ubatches=step.n_ubatches, n_kv=step.n_kv, n_kv_swa=step.n_kv_swa)
        return info, k_idxs[:n], pos[:n], (Context.wrap(self, ctx) if ctx != NULL else None)

    def state_size(self, int32_t seq=-1, uint32_t flags=0):
        cdef size_t n = 0
        cdef int rc
        with nogil:
            rc = api.state_size(self.mem, seq, flags, &n, self.err, ERR_LEN)
        check(rc, self.err)
        return n

    def state_write_into(self, buffer, int32_t seq=-1, uint32_t flags=0):
        cdef uint8_t[::1] buf = buffer
        cdef size_t written = 0
        cdef int rc
        cdef uint8_t* p = &buf[0] if buf.shape[0] > 0 else NULL
        with nogil:
            rc = api.state_write_into(self.mem, seq, flags, p, <size_t>buf.shape[0], &written, self.err, ERR_LEN)
        check(rc, self.err)
        return written

    def state_write(self, int32_t seq=-1, uint32_t flags=0):
        buf = bytearray(self.state_size(seq, flags))
        if len(buf) == 0:
            return b""
        n = self.state_write_into(buf, seq, flags)
        return bytes(buf[:n])

    def state_read(self, data, int32_t seq=-1, uint32_t flags=0):
        cdef const uint8_t[::1] d = memoryview(data).cast("B")
        cdef int rc
        cdef const uint8_t* p = &d[0] if d.shape[0] > 0 else NULL
        with nogil:
            rc = api.state_read(self.mem, seq, flags, p, <size_t>d.shape[0], self.err, ERR_LEN)
        check(rc, self.err)


cdef class Context:
    cdef capi.llmem_context* ctx
    cdef Memory owner
    cdef char err[ERR_LEN]

    @staticmethod
    cdef Context wrap(Memory owner, capi.llmem_context* ctx):
        cdef Context c = Context.__new__(Context)
        c.ctx = ctx
        c.owner = owner
        return c

    def __dealloc__(self):
        self.free()

    def free(self):
        if self.ctx != NULL:
            api.ctx_free(self.ctx)
            self.ctx = NULL

    @property
    def status(self):
        return api.ctx_status(self.ctx)

    @property
    def n_ubatches(self):
        return api.ctx_n_ubatches(self.ctx)

    def apply(self):
        cdef int rc
        with nogil:
            rc = api.ctx_apply(self.ctx, self.err, ERR_LEN)
        check(rc, self.err)

    def next(self):
        cdef int more = 0
        check(api.ctx_next(self.ctx, &more, self.err, ERR_LEN), self.err)
        return bool(more)

    def ubatch(self):
        cdef capi.llmem_ubatch u
        check(api.ctx_ubatch(self.ctx, &u, self.err, ERR_LEN), self.err)
        n = u.n_tokens
        return dict(
            n_tokens=n, n_seq_tokens=u.n_seq_tokens, n_seqs=u.n_seqs, n_seqs_unq=u.n_seqs_unq,
            equal_seqs=bool(u.equal_seqs),
            token=np.asarray(<int32_t[:n]>u.token).copy() if u.token != NULL else None,
            pos=np.asarray(<int32_t[:n]>u.pos).copy(),
            seq_id=np.asarray(<int32_t[:n]>u.seq_id).copy(),
            output=np.asarray(<int8_t[:n]>u.output).astype(bool),
            batch_idx=np.asarray(<int32_t[:n]>u.batch_idx).copy(),
            seq_id_unq=np.asarray(<int32_t[:u.n_seqs_unq]>u.seq_id_unq).copy(),
        )

    def kv_slot(self, int32_t part=0):
        cdef capi.llmem_kv_slot s
        check(api.ctx_kv_slot(self.ctx, part, &s, NULL, 0, self.err, ERR_LEN), self.err)
        k_idxs = np.empty(max(s.n_tokens, 1), np.int64)
        cdef int64_t[::1] kv = k_idxs
        check(api.ctx_kv_slot(self.ctx, part, &s, &kv[0], <size_t>kv.shape[0], self.err, ERR_LEN), self.err)
        return dict(n_tokens=s.n_tokens, n_kv=s.n_kv, head=s.head, s0=s.s0, s1=s.s1), k_idxs[:s.n_tokens]

    def kq_mask(self, int32_t part=0, bint causal=True):
        cdef capi.llmem_kv_slot s
        check(api.ctx_kv_slot(self.ctx, part, &s, NULL, 0, self.err, ERR_LEN), self.err)
        mask = np.empty((s.n_tokens, s.n_kv), np.float32)
        cdef float[:, ::1] mv = mask
        check(api.ctx_kq_mask(self.ctx, part, causal, &mv[0, 0], <size_t>mask.size, self.err, ERR_LEN), self.err)
        return mask

    def rs_slot(self):
        cdef capi.llmem_rs_slot s
        check(api.ctx_rs_slot(self.ctx, &s, NULL, 0, self.err, ERR_LEN), self.err)
        copies = np.empty(max(s.n_rs, 1), np.int32)
        cdef int32_t[::1] cv = copies
        check(api.ctx_rs_slot(self.ctx, &s, &cv[0], <size_t>cv.shape[0], self.err, ERR_LEN), self.err)
        return dict(head=s.head, n_rs=s.n_rs, rs_z=s.rs_z, n_seqs=s.n_seqs), copies[:s.n_rs]

    def rs_gather(self, int32_t kind, int32_t il, out):
        cdef uint8_t[::1] o = out.reshape(-1).view(np.uint8)
        check(api.ctx_rs_gather(self.ctx, kind, il, &o[0], <size_t>o.shape[0], self.err, ERR_LEN), self.err)

    def rs_store(self, int32_t kind, int32_t il, rows, uint32_t n_planes=1):
        cdef const uint8_t[::1] r = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
        check(api.ctx_rs_store(self.ctx, kind, il, &r[0], <size_t>r.shape[0], n_planes, self.err, ERR_LEN),
              self.err)


# -- a continuous-batching loop in one nogil block ----------------------------------------------

OP_PREFILL = 0   # seq, a = n_tokens, b = n_ubatch: init_batch, then apply/next every micro-batch
OP_DECODE = 1    # a = bit mask of the sequences (ascending ids): decode_step, one token each
OP_RM = 2        # seq_rm(seq, a, b)
OP_CP = 3        # seq_cp(seq, a, -1, -1)
OP_POS = 4       # seq_pos_min(seq), seq_pos_max(seq)
OP_SHIFT = 5     # seq_add(seq, a, -1, b), then update()
OP_KEEP = 6      # seq_keep(seq)

cdef enum:
    MAX_TOKENS = 4096


cdef int log_slot(const capi.llmem_capi* api, capi.llmem_context* ctx, int kind, int64_t* log, Py_ssize_t* at,
                  int64_t* rows, int32_t* copies) noexcept nogil:
    """Append what the applied micro-batch took: K rows of each KV part, recurrent slot and s_copy."""
    cdef capi.llmem_kv_slot s
    cdef capi.llmem_rs_slot r
    cdef int part, rc
    cdef uint32_t t
    if kind != capi.LLMEM_KIND_RECURRENT:
        for part in range(2 if kind == capi.LLMEM_KIND_KV_ISWA or kind == capi.LLMEM_KIND_HYBRID_ISWA else 1):
            rc = api.ctx_kv_slot(ctx, part, &s, rows, MAX_TOKENS, NULL, 0)
            if rc != 0:
                return rc
            log[at[0]] = s.n_kv
            log[at[0] + 1] = s.n_tokens
            at[0] += 2
            for t in range(s.n_tokens):
                log[at[0]] = rows[t]
                at[0] += 1
    if kind == capi.LLMEM_KIND_RECURRENT or kind == capi.LLMEM_KIND_HYBRID or kind == capi.LLMEM_KIND_HYBRID_ISWA:
        rc = api.ctx_rs_slot(ctx, &r, copies, MAX_TOKENS, NULL, 0)
        if rc != 0:
            return rc
        log[at[0]] = r.head
        log[at[0] + 1] = r.n_rs
        log[at[0] + 2] = r.rs_z
        at[0] += 3
        for t in range(r.n_rs):
            log[at[0]] = copies[t]
            at[0] += 1
    return 0


def run_workload(Memory m, const int32_t[:, ::1] ops, Py_ssize_t log_capacity=1 << 20):
    """Run `ops` (rows: op, seq, a, b) through the C API without the GIL; returns the log (int64),
    the same record tests/python/test_capi.py builds with the Python API: for every op its return
    code, then what it decided."""
    log = np.zeros(log_capacity, np.int64)
    cdef int64_t[::1] lg = log
    cdef int64_t* L = &lg[0]
    cdef Py_ssize_t at = 0, i
    cdef int32_t* tokens = <int32_t*>malloc(MAX_TOKENS * sizeof(int32_t))
    cdef int32_t* seqs = <int32_t*>malloc(MAX_TOKENS * sizeof(int32_t))
    cdef int64_t* rows = <int64_t*>malloc(MAX_TOKENS * sizeof(int64_t))
    cdef int32_t* copies = <int32_t*>malloc(MAX_TOKENS * sizeof(int32_t))
    cdef int32_t* pos = <int32_t*>malloc(MAX_TOKENS * sizeof(int32_t))
    cdef int kind = m.info()["kind"]
    cdef capi.llmem_memory* mem = m.mem
    cdef capi.llmem_context* ctx
    cdef capi.llmem_batch b
    cdef capi.llmem_step step
    cdef int32_t status, seq, a, bb, p_min, p_max
    cdef int rc, more, removed, applied, op, j, n
    if tokens == NULL or seqs == NULL or rows == NULL or copies == NULL or pos == NULL:
        free(tokens); free(seqs); free(rows); free(copies); free(pos)
        raise MemoryError()
    try:
        with nogil:
            for i in range(ops.shape[0]):
                if at + 4 * MAX_TOKENS > log_capacity:
                    break
                op, seq, a, bb = ops[i, 0], ops[i, 1], ops[i, 2], ops[i, 3]
                if op == 0:
                    n = a
                    for j in range(n):
                        tokens[j] = (seq * 7 + j) % 50
                        seqs[j] = seq
                    memset(&b, 0, sizeof(b))
                    b.n_tokens = n
                    b.token = tokens
                    b.seq_id = seqs
                    ctx = NULL
                    rc = api.init_batch(mem, &b, bb, 0, &ctx, &status, NULL, 0)
                    L[at] = rc
                    L[at + 1] = status if rc == 0 else -1
                    at += 2
                    if ctx != NULL:
                        more = 1
                        while more:
                            rc = api.ctx_apply(ctx, NULL, 0)
                            if rc == 0:
                                rc = log_slot(api, ctx, kind, L, &at, rows, copies)
                            if rc == 0:
                                rc = api.ctx_next(ctx, &more, NULL, 0)
                            if rc != 0:
                                L[at] = rc
                                at += 1
                                break
                        api.ctx_free(ctx)
                elif op == 1:
                    n = 0
                    for j in range(31):
                        if a & (1 << j):
                            seqs[n] = j
                            tokens[n] = j + 1
                            n += 1
                    ctx = NULL
                    rc = api.decode_step(mem, seqs, tokens, n, 0, &step, rows, pos, &ctx, NULL, 0)
                    L[at] = rc
                    L[at + 1] = step.status if rc == 0 else -1
                    at += 2
                    if ctx != NULL:
                        L[at] = step.n_ubatches
                        at += 1
                        more = 1
                        while more:
                            rc = log_slot(api, ctx, kind, L, &at, rows, copies)
                            if rc == 0:
                                rc = api.ctx_next(ctx, &more, NULL, 0)
                            if rc == 0 and more:
                                rc = api.ctx_apply(ctx, NULL, 0)
                            if rc != 0:
                                L[at] = rc
                                at += 1
                                break
                        api.ctx_free(ctx)
                elif op == 2:
                    rc = api.seq_rm(mem, seq, a, bb, &removed, NULL, 0)
                    L[at] = rc
                    L[at + 1] = removed if rc == 0 else -1
                    at += 2
                elif op == 3:
                    rc = api.seq_cp(mem, seq, a, -1, -1, NULL, 0)
                    L[at] = rc
                    at += 1
                elif op == 4:
                    rc = api.seq_pos_min(mem, seq, &p_min, NULL, 0)
                    if rc == 0:
                        rc = api.seq_pos_max(mem, seq, &p_max, NULL, 0)
                    L[at] = rc
                    L[at + 1] = p_min if rc == 0 else -2
                    L[at + 2] = p_max if rc == 0 else -2
                    at += 3
                elif op == 5:
                    rc = api.seq_add(mem, seq, a, -1, bb, NULL, 0)
                    if rc == 0:
                        rc = api.update(mem, &applied, NULL, 0)
                    L[at] = rc
                    at += 1
                elif op == 6:
                    rc = api.seq_keep(mem, seq, NULL, 0)
                    L[at] = rc
                    at += 1
    finally:
        free(tokens); free(seqs); free(rows); free(copies); free(pos)
    return log[:at]


# -- timing single calls (bench/bench_capi.py) ------------------------------------------------

from time import perf_counter_ns


# `hold`: the loop runs with the memory's lock held (a server holding it for its step), so each
# call's own lock is the re-entrant fast path; without it every call takes and frees the lock.

def time_seq_pos_max(Memory m, int32_t n_seq, Py_ssize_t repeat, bint hold=False):
    """Nanoseconds per seq_pos_max call, cycling over n_seq sequences, without the GIL."""
    cdef Py_ssize_t i
    cdef int32_t out = 0
    cdef int64_t acc = 0
    t0 = perf_counter_ns()
    with nogil:
        if hold:
            api.lock(m.mem)
        for i in range(repeat):
            api.seq_pos_max(m.mem, <int32_t>(i % n_seq), &out, NULL, 0)
            acc += out
        if hold:
            api.unlock(m.mem)
    return (perf_counter_ns() - t0) / repeat


def time_seq_rm_tail(Memory m, const int32_t[::1] seqs, const int32_t[::1] p0, bint hold=False):
    """Nanoseconds per seq_rm(seq, p0, -1) over the given pairs (one call each)."""
    cdef Py_ssize_t i, n = seqs.shape[0]
    cdef int removed = 0
    t0 = perf_counter_ns()
    with nogil:
        if hold:
            api.lock(m.mem)
        for i in range(n):
            api.seq_rm(m.mem, seqs[i], p0[i], -1, &removed, NULL, 0)
        if hold:
            api.unlock(m.mem)
    return (perf_counter_ns() - t0) / n


def time_decode_step(Memory m, const int32_t[::1] seqs, Py_ssize_t steps, bint hold=False):
    """Nanoseconds per decode_step over `seqs` (cells written into caller buffers, context ended),
    then the steps are removed again with seq_rm tails (not timed)."""
    cdef uint32_t n = <uint32_t>seqs.shape[0]
    k_idxs = np.empty(n, np.int64)
    pos = np.empty(n, np.int32)
    cdef int64_t[::1] kv = k_idxs
    cdef int32_t[::1] pv = pos
    cdef capi.llmem_step step
    cdef Py_ssize_t s
    cdef int rc = 0
    t0 = perf_counter_ns()
    with nogil:
        if hold:
            api.lock(m.mem)
        for s in range(steps):
            rc = api.decode_step(m.mem, &seqs[0], NULL, n, 0, &step, &kv[0], &pv[0], NULL, NULL, 0)
            if rc != 0 or step.status != 0:
                break
        if hold:
            api.unlock(m.mem)
    elapsed = perf_counter_ns() - t0
    if rc != 0 or step.status != 0:
        raise CapiError(rc, f"decode_step failed (status {step.status})")
    return elapsed / steps
