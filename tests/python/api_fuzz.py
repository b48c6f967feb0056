"""Issue 20: a fuzzer of llmem's public API as a whole.

Any public method or property of any memory (the five kinds and their parts), of any context they
return (batch, full and update contexts and their sub-contexts) and of a batch allocator is called,
in any order, from several threads, with arguments drawn from a hostile strategy: wrong types,
NaN and infinities, huge and negative ints, numpy scalars, arrays of the wrong shape, dtype,
strides or order, read-only arrays, arrays aliasing the memory's own buffers, damaged state bytes,
position sources that misbehave; mixed with plausible arguments so that the calls also get deep.

Every call on a memory (or on an object that can change it) runs under the memory's lock between
two snapshots (cell tables of every part, rollback depths, used counts, state bytes, a hash of every
buffer), and after it:

* a raised exception must be a ``TypeError``, ``ValueError`` (not ``UnicodeError``) or llmem error,
  and the snapshot must be unchanged;
* a call that returned must leave every KV part passing its core invariant check, every
  sequence's ``seq_pos_min``/``seq_pos_max`` equal to what its cells say, and, for the sequence
  operations, the cell tables equal to the reference models' (``reference/ref_kv.py``,
  ``reference/ref_recurrent.py``) started from the cells before the call and given the same
  operation.

Anything else (another exception type, a crash, a changed memory after a refusal, a disagreement)
is a finding. ``tests/python/test_api_fuzz.py`` drives it with hypothesis (``st.randoms``) in CI;
the long run is ``python tests/python/api_fuzz.py --calls 1000000`` (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import math
import os
import random
import sys
import threading
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llmem  # noqa: E402
from llmem import (STATE_HEADER, Batch, BatchAllocator, HybridISWAMemory, HybridMemory, KVCache,  # noqa: E402
                   KVCacheISWA, LlmemError, RecurrentMemory)
from llmem.kv_cache import KVCacheISWAContext  # noqa: E402
from memory_zoo import MEMORIES, N_SEQ, decode  # noqa: E402
from reference.ref_kv import RefKV  # noqa: E402
from reference.ref_recurrent import RefRecurrent  # noqa: E402

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
ALLOWED = (TypeError, ValueError, LlmemError)

# names never called: file output (save would write files named by hostile strings), and
# iteration, which is a loop of apply/next calls that the fuzzer makes one at a time
SKIP = {"save", "load"}


class Finding(AssertionError):
    """A call broke a promise (kept with the call that did it)."""


# -- hostile and plausible values ---------------------------------------------------------------------


class PlantedError(Exception):
    """Raised by the fuzzer's own argument objects (an __index__ that fails): propagating it is
    right, as int(x) does; the memory must still be unchanged."""


REFUSALS = ALLOWED + (PlantedError,)


class BadIndex:
    """An object whose __index__ raises or lies."""

    def __init__(self, value):
        self.value = value

    def __index__(self):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class PosSource:
    """A memory stand-in for BatchAllocator.init: answers are drawn hostile."""

    def __init__(self, answer):
        self.answer = answer

    def seq_pos_min(self, seq_id):
        return self.answer(seq_id)

    def seq_pos_max(self, seq_id):
        return self.answer(seq_id)


INTS = [0, 1, 2, 3, -1, -2, N_SEQ, N_SEQ - 1, 255, 256, 7, 64, I32_MAX, I32_MAX - 1, I32_MIN, I32_MAX + 1,
        I32_MIN - 1, 2**32, 2**63 - 1, 2**63, -(2**63), 2**64, 10**30]
FLOATS = [math.nan, math.inf, -math.inf, 1.5, -0.0, 3.0, 1e300]
DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64, np.uint16, np.uint8, np.complex64, np.bool_,
          object]


class World:
    """The memories under test (one of each kind) and the objects calls have returned."""

    def __init__(self, kinds=None):
        self.kinds = sorted(kinds or MEMORIES)
        self.memories = {k: MEMORIES[k]() for k in self.kinds}
        self.contexts = {k: collections.deque(maxlen=6) for k in self.kinds}
        self.blobs = {k: collections.deque(maxlen=6) for k in self.kinds}
        self.balloc = BatchAllocator(N_SEQ)
        self.balloc_lock = threading.Lock()
        for k, mem in self.memories.items():
            for seq, n in ((0, 3), (1, 5), (2, 2)):
                decode(mem, seq, n)


def plausible_int(rng):
    return rng.choice([-1, 0, 1, 2, 3, rng.randint(-2, 12), rng.randint(0, N_SEQ - 1)])


def plausible_batch(rng):
    n = rng.randint(1, 6)
    seq = [rng.randint(0, N_SEQ - 1)] * n if rng.random() < 0.7 else [rng.randint(0, N_SEQ - 1) for _ in range(n)]
    kw = {"token": np.ones(n, np.int32), "seq_id": np.array(seq, np.int32)}
    if rng.random() < 0.15:
        kw["pos"] = np.array([rng.randint(-1, 12) + i for i in range(n)], np.int32)
    if rng.random() < 0.1:
        kw["seq_id"] = [[s, (s + 1) % N_SEQ] for s in seq]
    try:
        return Batch(**kw)
    except (TypeError, ValueError):
        return Batch(token=np.ones(n, np.int32), seq_id=np.zeros(n, np.int32))


def hostile_array(rng, mem):
    shape = rng.choice([(0,), (2, 8), (2, 7), (8, 2), (3, 8), (1, 8), (2, 2, 4), (1, 4), (1, 6), (2, 6), (3, 1, 6),
                        (16,), (1, 1), (2, 16)])
    dtype = rng.choice(DTYPES)
    a = np.zeros(shape, dtype) if dtype is not object else np.empty(shape, object)
    if dtype is not object and a.size and rng.random() < 0.3:
        try:
            with np.errstate(all="ignore"):
                a[...] = rng.choice([np.nan, np.inf, 1.0, -1.0, 1e5])
        except (ValueError, OverflowError):  # NaN into an integer array
            a[...] = 1
    r = rng.random()
    if r < 0.15 and a.ndim >= 1 and a.shape[-1] > 1:
        a = np.repeat(a, 2, axis=-1)[..., ::2]  # non-contiguous
    elif r < 0.3:
        a = np.asfortranarray(a)
    elif r < 0.45:
        a.setflags(write=False)
    elif r < 0.65:
        a = alias_of(rng, mem, a)
    return a


def alias_of(rng, mem, default):
    """A view of one of the memory's own buffers (aliasing what a call writes)."""
    parts = [mem]
    for name in ("base", "swa", "mem_attn", "mem_recr"):
        if hasattr(mem, name):
            parts.append(getattr(mem, name))
    for part in rng.sample(parts, len(parts)):
        if isinstance(part, KVCache) and part.layers:
            buf = part.k(rng.choice(part.layers)) if rng.random() < 0.5 else part.v(rng.choice(part.layers))
            return buf[0, :2] if rng.random() < 0.5 else buf[0]
        if isinstance(part, RecurrentMemory):
            layers = [il for il in range(part.n_layer) if part.has_layer(il)]
            if layers:
                buf = part.s(rng.choice(layers))
                return buf[:1] if rng.random() < 0.5 else buf[:2]
    return default


def state_bytes(rng, world, kind):
    mem = world.memories[kind]
    if world.blobs[kind] and rng.random() < 0.5:
        blob = bytearray(rng.choice(world.blobs[kind]))
    else:
        try:
            blob = bytearray(mem.state_write(rng.choice([-1, 0, 1, 2]),
                                             rng.choice([0, 0, 1, STATE_HEADER, STATE_HEADER | 1])))
        except ALLOWED:
            blob = bytearray(b"\0" * 8)
    r = rng.random()
    if blob and r < 0.3:
        for _ in range(rng.randint(1, 3)):
            blob[rng.randrange(len(blob))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif r < 0.4:
        del blob[rng.randrange(len(blob) + 1):]
    elif r < 0.5:
        blob += bytes(rng.randint(1, 9))
    out = bytes(blob)
    pick = rng.random()
    if pick < 0.1:
        return np.frombuffer(out, np.uint8)
    if pick < 0.15:
        return memoryview(out)
    if pick < 0.2:
        return bytearray(out)
    return out


def hostile(rng, world, kind):
    try:
        return _hostile(rng, world, kind)
    except (OverflowError, ValueError, TypeError):  # a numpy scalar that cannot hold the value
        return rng.choice(INTS)


def _hostile(rng, world, kind):
    mem = world.memories[kind]
    r = rng.random()
    if r < 0.25:
        return rng.choice(INTS)
    if r < 0.32:
        return rng.choice(FLOATS)
    if r < 0.38:
        return rng.choice([np.int32, np.int64, np.uint64, np.int8, np.float32])(rng.choice([0, 1, 3, 255, -1]))
    if r < 0.42:
        return rng.choice([None, True, False, np.bool_(True), "", "3", "seq", b"\0", [], [1, 2], (3,), {}, object(),
                           lambda *a: 0, BadIndex(3), BadIndex(2**40), BadIndex(ValueError("bad __index__")),
                           BadIndex(PlantedError("index failed"))])
    if r < 0.6:
        return hostile_array(rng, mem)
    if r < 0.7:
        return state_bytes(rng, world, kind)
    if r < 0.78:
        return plausible_batch(rng)
    if r < 0.82 and world.contexts[kind]:
        return rng.choice(world.contexts[kind])
    if r < 0.85:
        return rng.choice([world.balloc, mem, PosSource(lambda s: rng.choice([1, "x", None, 2**40, 1.5, -7]))])
    return plausible_int(rng)


def argument(rng, world, kind, plausible):
    return plausible() if rng.random() < 0.6 else hostile(rng, world, kind)


# -- what to call ---------------------------------------------------------------------------------------


_NAMES = {}


def public_names(obj):
    if not hasattr(obj, "__dict__"):
        names = _NAMES.get(type(obj))
        if names is None:
            names = _NAMES[type(obj)] = _public_names(obj)
        return names
    return _public_names(obj)


def _public_names(obj):
    names = []
    for name in dir(type(obj)):
        if name.startswith("_") or name in SKIP:
            continue
        names.append(name)
    if hasattr(obj, "__dict__"):
        names += [n for n in vars(obj) if not n.startswith("_") and n not in SKIP]
    return sorted(set(names))


def targets(world, kind):
    """(object, changes the memory?) pairs of this kind's world: the memory, its parts, contexts."""
    mem = world.memories[kind]
    out = [mem]
    for name in ("base", "swa", "mem_attn", "mem_recr"):
        part = getattr(mem, name, None)
        if part is not None:
            out.append(part)
            for sub in ("base", "swa"):
                if getattr(part, sub, None) is not None:
                    out.append(getattr(part, sub))
    for ctx in list(world.contexts[kind]):
        out.append(ctx)
        for sub in ("base", "swa", "attn", "recr"):
            inner = getattr(ctx, sub, None)
            if inner is not None:
                out.append(inner)
    return out


def plausible_args(rng, world, kind, obj, name):
    """Arguments of the right kind for the method (values still drawn wide)."""
    mem = world.memories[kind]
    layers = []
    for part in (mem, getattr(mem, "mem_attn", None)):
        if part is not None and hasattr(part, "layers"):
            layers = part.layers
    recr = mem if isinstance(mem, RecurrentMemory) else getattr(mem, "mem_recr", None)
    il_any = lambda: rng.choice(layers + ([il for il in range(recr.n_layer) if recr.has_layer(il)] if recr else [])
                                + [0, 1, 2, -1])
    seq = lambda: plausible_int(rng)
    pos = lambda: rng.choice([-1, 0, 1, 2, 3, 5, 8, rng.randint(-3, 20)])
    table = {
        "init_batch": lambda: [plausible_batch(rng), rng.choice([1, 2, 4, 8])],
        "init_full": lambda: [],
        "init_update": lambda: [],
        "clear": lambda: [rng.choice([True, False])],
        "seq_rm": lambda: [seq(), pos(), pos()],
        "seq_cp": lambda: [seq(), seq(), pos(), pos()],
        "seq_keep": lambda: [seq()],
        "seq_add": lambda: [seq(), pos(), pos(), rng.choice([-3, -1, 1, 2, 5, I32_MAX - 4, I32_MAX, I32_MIN])],
        "seq_div": lambda: [seq(), pos(), pos(), rng.choice([0, 1, 2, 3, -1])],
        "seq_pos_min": lambda: [seq()],
        "seq_pos_max": lambda: [seq()],
        "state_write": lambda: [rng.choice([-1, 0, 1, 2, 3]), rng.choice([0, 1, STATE_HEADER, STATE_HEADER | 1])],
        "state_size": lambda: [rng.choice([-1, 0, 1, 2, 3]), rng.choice([0, 1, STATE_HEADER])],
        "state_read": lambda: [state_bytes(rng, world, kind), rng.choice([-1, 0, 1, 2, 3]),
                               rng.choice([0, 1, STATE_HEADER, STATE_HEADER | 1])],
        "state_write_into": lambda: [bytearray(rng.choice([0, 8, 1 << 12, 1 << 16])), rng.choice([-1, 0, 1]),
                                     rng.choice([0, STATE_HEADER])],
        "state_clear": lambda: [seq()],
        "k": lambda: [il_any()],
        "v": lambda: [il_any()],
        "r": lambda: [il_any()],
        "s": lambda: [il_any()],
        "has_layer": lambda: [il_any()],
        "is_recurrent_layer": lambda: [il_any()],
        "head_of": lambda: [rng.choice([0, 1, 3, 4, -1])],
        "cpy_k": lambda: [il_any(), np.full((rng.choice([1, 2]), 8), 0.5, np.float32)],
        "cpy_v": lambda: [il_any(), np.full((rng.choice([1, 2]), 8), 0.5, np.float32)],
        "get_k": lambda: [il_any()],
        "get_v": lambda: [il_any()],
        "kq_mask": lambda: [il_any()] if isinstance(obj, KVCacheISWAContext) else [rng.choice([True, False])],
        "kq_cells": lambda: [rng.choice([True, False])],
        "get_r": lambda: [il_any()],
        "get_s": lambda: [il_any()],
        "store_r": lambda: [il_any(), np.zeros((1, 4), np.float32)],
        "store_s": lambda: [il_any(), np.zeros((rng.choice([1, 2]), 6), np.float32)],
        "s_copy": lambda: [rng.choice([0, 1, 2, -1, 9])],
        "p": lambda: [il_any()],
        "has_p": lambda: [il_any()],
        "get_p": lambda: [il_any()],
        "store_p": lambda: [il_any(), np.zeros((1, 4), np.float32)],
        "init": lambda: [plausible_batch(rng), rng.choice([mem, None, PosSource(lambda s: -1)]),
                         rng.choice([False, True])],
        "split_simple": lambda: [rng.choice([1, 2, 8])],
        "split_equal": lambda: [rng.choice([1, 2, 8]), rng.choice([False, True])],
        "split_seq": lambda: [rng.choice([1, 2, 8])],
        "batch_pos_min": lambda: [seq()],
        "batch_pos_max": lambda: [seq()],
    }
    make = table.get(name)
    return make() if make else None


def draw_call(rng, world, kind):
    """(object, name, args) of one call; args None for a property read."""
    mem = world.memories[kind]
    if rng.random() < 0.08:
        obj = world.balloc
    else:
        objs = targets(world, kind)
        # contexts are where ordering bugs live: favour them when there are some
        obj = rng.choice(objs[-4:]) if len(objs) > 4 and rng.random() < 0.4 else rng.choice(objs)
    names = public_names(obj)
    if not names:
        return obj, None, None
    name = rng.choice(names)
    attr = getattr(type(obj), name, None)
    if isinstance(attr, property) or not callable(getattr(obj, name, None)):
        return obj, name, None
    plausible = plausible_args(rng, world, kind, obj, name)
    if plausible is None:
        plausible = [plausible_int(rng) for _ in range(rng.randint(0, 2))]
    args = []
    for a in plausible:
        args.append(a if rng.random() < 0.75 else hostile(rng, world, kind))
    if rng.random() < 0.05:
        args.append(hostile(rng, world, kind))  # one argument too many
    elif args and rng.random() < 0.05:
        args.pop()  # one too few
    del mem
    return obj, name, args


# -- snapshots and the reference check -----------------------------------------------------------------


def parts(mem):
    if isinstance(mem, (HybridMemory, HybridISWAMemory)):
        return parts(mem.mem_attn) + parts(mem.mem_recr)
    if isinstance(mem, KVCacheISWA):
        return [mem.base, mem.swa]
    return [mem]


def snapshot(mem):
    h = hashlib.sha256()
    meta = []
    for part in parts(mem):
        if isinstance(part, KVCache):
            for il in part.layers:
                h.update(part.k(il).tobytes())
                h.update(part.v(il).tobytes())
            c = part._core
            meta.append([c.cells(s) for s in range(part.n_stream)])
            meta[-1] = [(d["pos"].tobytes(), d["shift"].tobytes(), d["n_seq"].tobytes(), d["seq_ids"].tobytes(),
                         d["head"]) for d in meta[-1]]
            meta.append((c.used, c.get_has_shift(), bool(c.update_pending())))
        else:
            for il in range(part.n_layer):
                if part.has_layer(il):
                    h.update(part.r(il).tobytes())
                    h.update(part.s(il).tobytes())
            cells = part._mem.cells()
            meta.append((cells["pos"].tobytes(), cells["src"].tobytes(), cells["src0"].tobytes(),
                         cells["tail"].tobytes(), tuple(map(tuple, cells["seq_ids"]))))
            meta.append((part._mem.rs_idx().tobytes(), part._mem.used, part._mem.head))
    try:
        state = mem.state_write(-1)
    except LlmemError as e:  # a whole write llama.cpp refuses too (diverged rollbacks)
        state = "refused: " + str(e)
    return meta, h.hexdigest(), state


def ref_kv_from(part):
    cells = part.cells()
    # the window only matters for placement, which the reference is not asked for here
    ref = RefKV(part.size, part.n_seq_max, part.n_stream == 1)
    for s in range(part.n_stream):
        for i in range(part.size):
            c = ref.cells[s][i]
            c.pos = int(cells["pos"][s][i])
            c.shift = int(cells["shift"][s][i])
            c.seqs = set(cells["seqs"][s][i])
        ref.heads[s] = int(cells["head"][s])
    ref.has_shift = [part.get_has_shift()] * part.n_stream
    return ref


def ref_recurrent_from(part):
    core = part._mem
    cells = core.cells()
    ref = RefRecurrent(part.size, part.n_seq_max, part.n_rs_seq)
    for i, c in enumerate(ref.cells):
        c.pos, c.src, c.src0, c.tail = (int(cells[k][i]) for k in ("pos", "src", "src0", "tail"))
        c.ids = set(cells["seq_ids"][i])
    ref.head, ref.used = core.head, core.used
    ref.rs_idx = [int(x) for x in core.rs_idx()]
    return ref


def same_kv(part, ref, what):
    got = part.cells()
    exp = ref.snapshot()
    if (got["pos"].tolist() != exp["pos"] or got["seqs"] != exp["seqs"] or got["shift"].tolist() != exp["shift"]
            or got["head"] != exp["head"]):
        raise Finding(f"{what}: the KV cells differ from the reference's")


def same_recurrent(part, ref, what):
    got = part._mem.cells()
    exp = ref.snapshot()
    for key in ("pos", "tail", "src"):
        if [int(x) for x in got[key]] != exp[key]:
            raise Finding(f"{what}: recurrent {key} differs from the reference's: {list(got[key])} vs {exp[key]}")
    if [tuple(sorted(x)) for x in got["seq_ids"]] != exp["seq_ids"]:
        raise Finding(f"{what}: recurrent seq_ids differ from the reference's")
    if [int(x) for x in part._mem.rs_idx()] != ref.rs_idx:
        raise Finding(f"{what}: pending rollbacks differ from the reference's")


SEQ_OPS = {"clear", "seq_rm", "seq_cp", "seq_keep", "seq_add", "seq_div"}


def reference_models(mem):
    out = []
    for part in parts(mem):
        if isinstance(part, KVCache):
            out.append((part, ref_kv_from(part)))
        else:
            out.append((part, ref_recurrent_from(part)))
    return out


def mirror(obj, name, args, refs, result):
    """Give the reference models the sequence operation that just succeeded on ``obj``."""
    ints = [int(a) for a in args]
    targets_of = {id(p): (p, r) for p, r in refs}
    if isinstance(obj, (HybridMemory, HybridISWAMemory)):
        kv = [(p, r) for p, r in refs if isinstance(p, KVCache)]
        rec = [(p, r) for p, r in refs if isinstance(p, RecurrentMemory)]
        if name == "seq_rm":
            full = (ints + [-1, -1])[:3]
            if not rec[0][1].seq_rm(*full):
                if result is not False:
                    raise Finding(f"hybrid seq_rm{tuple(full)} returned {result!r}, the reference refuses")
                return
            for _, r in kv:
                r.seq_rm(*full)
            return
        for p, r in kv + rec:
            apply_ref(r, name, ints)
        return
    if isinstance(obj, KVCacheISWA):
        for p, r in refs:
            if p is obj.base or p is obj.swa:
                apply_ref(r, name, ints)
        return
    if id(obj) in targets_of:
        _, r = targets_of[id(obj)]
        ret = apply_ref(r, name, ints)
        if name == "seq_rm" and isinstance(obj, RecurrentMemory) and ret != result:
            raise Finding(f"seq_rm{tuple(ints)} returned {result!r}, the reference {ret!r}")


def apply_ref(ref, name, ints):
    if name == "clear":
        if isinstance(ref, RefKV):
            for row in ref.cells:
                for c in row:
                    c.empty()
            ref.heads = [0] * ref.n_stream
            ref.has_shift = [False] * ref.n_stream
        else:
            ref.clear()
        return None
    defaults = {"seq_rm": [-1, -1, -1], "seq_cp": [0, 0, -1, -1], "seq_keep": [0]}
    full = ints + defaults.get(name, [])[len(ints):]
    return getattr(ref, name)(*full)


def check_consistent(mem, what):
    for part in parts(mem):
        if isinstance(part, KVCache):
            if not part._core.check_invariants():
                raise Finding(f"{what}: a KV part fails its invariant check")
            ref = ref_kv_from(part)
            for s in range(part.n_seq_max):
                if (part.seq_pos_min(s), part.seq_pos_max(s)) != (ref.seq_pos_min(s), ref.seq_pos_max(s)):
                    raise Finding(f"{what}: seq_pos_min/max of {s} disagree with the cells")
        else:
            ref = ref_recurrent_from(part)
            for s in range(part.n_seq_max):
                if (part.seq_pos_min(s), part.seq_pos_max(s)) != (ref.seq_pos_min(s), ref.seq_pos_max(s)):
                    raise Finding(f"{what}: recurrent seq_pos_min/max of {s} disagree with the cells")


# -- running -------------------------------------------------------------------------------------------


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.calls = 0
        self.raised = collections.Counter()
        self.returned = 0
        self.mirrored = 0
        self.findings = []

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def describe(obj, name, args):
    def short(a):
        r = repr(a)
        return r if len(r) < 60 else r[:57] + "..."
    shown = "" if args is None else "(" + ", ".join(short(a) for a in args) + ")"
    return f"{type(obj).__name__}.{name}{shown}"


class _Describe:
    """The call as text, made only when a message needs it (repr of arrays is slow)."""

    def __init__(self, obj, name, args):
        self.obj, self.name, self.args = obj, name, args

    def __str__(self):
        return describe(self.obj, self.name, self.args)

    __format__ = lambda self, spec: format(str(self), spec)


def one_call(rng, world, kind, stats):
    mem = world.memories[kind]
    obj, name, args = draw_call(rng, world, kind)
    if name is None:
        return
    what = _Describe(obj, name, args)
    on_balloc = obj is world.balloc
    lock = mem.lock
    with lock, (world.balloc_lock if on_balloc else _NULL):
        before = snapshot(mem)
        refs = reference_models(mem) if name in SEQ_OPS and args is not None else None
        try:
            attr = getattr(obj, name)
            result = attr if args is None else attr(*args)
        except REFUSALS as e:
            if isinstance(e, UnicodeError):
                raise Finding(f"{what} raised {type(e).__name__}: {e}") from e
            if snapshot(mem) != before:
                raise Finding(f"{what} raised {type(e).__name__} ({e}) and changed the memory") from e
            stats.add(calls=1)
            with stats.lock:
                stats.raised[type(e).__name__] += 1
            return
        except Exception as e:
            raise Finding(f"{what} raised {type(e).__name__}: {e}") from e
        stats.add(calls=1, returned=1)
        changed = snapshot(mem) != before
        if name in ("init_batch", "init_full", "init_update") and result is not None:
            world.contexts[kind].append(result)
        if name == "state_write" and isinstance(result, bytes):
            world.blobs[kind].append(result)
        if refs is not None and all(type(a) is int or isinstance(a, (np.integer, bool)) for a in args):
            mirror(obj, name, args, refs, result)
            for part, ref in refs:
                (same_kv if isinstance(part, KVCache) else same_recurrent)(part, ref, what)
            stats.add(mirrored=1)
        if changed:  # an unchanged memory is as consistent as it was
            check_consistent(mem, what)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _Null()


def run(calls, threads=4, seed=0, kinds=None, rng=None, progress=None):
    """Make ``calls`` calls from ``threads`` threads; returns Stats (raises Finding on the first
    finding, with the call that made it)."""
    world = World(kinds)
    stats = Stats()
    master = rng or random.Random(seed)
    seeds = [master.randrange(2**63) for _ in range(threads)]
    per_thread = [calls // threads + (1 if t < calls % threads else 0) for t in range(threads)]
    errors = []

    def worker(t):
        local = random.Random(seeds[t])
        try:
            for i in range(per_thread[t]):
                kind = local.choice(world.kinds)
                one_call(local, world, kind, stats)
                if progress and t == 0 and i % 5000 == 0:
                    progress(stats)
        except BaseException as e:
            errors.append((e, traceback.format_exc()))

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    if errors:
        e, tb = errors[0]
        if isinstance(e, Finding):
            raise Finding(f"{e}\n{tb}") from e
        raise e
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=int(os.environ.get("LLMEM_API_FUZZ_CALLS", "20000")))
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--chunk", type=int, default=20000, help="calls per fresh world (memories rebuilt)")
    args = p.parse_args(argv)
    start = time.time()
    total = 0
    raised = collections.Counter()
    mirrored = returned = 0
    chunk_seed = random.Random(args.seed)
    while total < args.calls:
        n = min(args.chunk, args.calls - total)
        s = run(n, args.threads, chunk_seed.randrange(2**63))
        total += s.calls
        raised.update(s.raised)
        mirrored += s.mirrored
        returned += s.returned
        print(f"{total} calls, {returned} returned, {sum(raised.values())} refused, {mirrored} checked against "
              f"the reference, {time.time() - start:.0f} s", flush=True)
    print("refusals by type:", dict(raised.most_common()))
    print(f"done: {total} calls in {time.time() - start:.0f} s, no finding")


if __name__ == "__main__":
    main()
