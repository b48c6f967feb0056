"""Issue 20: the classes of the ten defects, tested as classes.

* int32 limits: every operation of every memory kind with a sequence ending at INT32_MAX - k
  (k = 0, 1, 2, 5): it either works with the right positions or is refused with the memory
  unchanged; nothing wraps.
* composite memories (iSWA, hybrid, hybrid-iSWA) check every part before changing any: for every
  sequence operation, a refusal injected into each part's check in turn must leave the whole
  memory unchanged (and the real cases: parts holding different positions).
* contexts refuse the calls their state does not allow: writes before apply, applies after the
  end, anything on a failed plan; a refused call changes nothing.
"""

import numpy as np
import pytest

from llmem import (Batch, BatchError, HybridISWAMemory, HybridMemory, KVCacheISWA, LlmemError, StateError,
                   Status)
from memory_zoo import MEMORIES, decode, filled, kv_parts, recurrent_parts, snapshot

I32_MAX = 2**31 - 1
KINDS = sorted(MEMORIES)
ALLOWED = (TypeError, ValueError, LlmemError)


# -- int32 limits ---------------------------------------------------------------------------------------


def at_limit(kind, k):
    """A memory of ``kind`` whose sequence 1 ends at INT32_MAX - k (sequences 0 and 2 as filled)."""
    mem = filled(kind)
    top = mem.seq_pos_max(1)
    mem.seq_add(1, 0, -1, I32_MAX - k - top)
    assert mem.seq_pos_max(1) == I32_MAX - k
    return mem


def batch_of(seq, n, pos=None):
    kw = {"token": np.ones(n, np.int32), "seq_id": np.full(n, seq, np.int32)}
    if pos is not None:
        kw["pos"] = np.asarray(pos, np.int32)
    return Batch(**kw)


def decode_batch(mem, batch):
    ctx = mem.init_batch(batch, 8)
    if ctx.status != Status.SUCCESS:
        return ctx.status
    for _ in ctx:
        pass
    return ctx.status


OPERATIONS = {
    # name: (call, whether it must succeed given k)
    "decode_auto_one": (lambda m, k: decode_batch(m, batch_of(1, 1)), lambda k: k >= 1),
    "decode_auto_k": (lambda m, k: decode_batch(m, batch_of(1, max(k, 1))), lambda k: k >= 1),
    "decode_auto_k_plus_1": (lambda m, k: decode_batch(m, batch_of(1, k + 1)), lambda k: False),
    "decode_explicit_to_max": (lambda m, k: decode_batch(m, batch_of(1, k, np.arange(I32_MAX - k + 1, I32_MAX + 1)
                                                                    if k else [0])), lambda k: k >= 1),
    "seq_add_to_max": (lambda m, k: m.seq_add(1, 0, -1, k), lambda k: True),
    # at k = 0 the last cell is outside [0, -1) = [0, INT32_MAX) (llama.cpp's range): no change
    "seq_add_past_max": (lambda m, k: m.seq_add(1, 0, -1, k + 1), lambda k: None if k == 0 else False),
    "seq_add_huge": (lambda m, k: m.seq_add(1, -1, -1, I32_MAX), lambda k: None if k == 0 else False),
    "seq_add_back": (lambda m, k: m.seq_add(1, 0, -1, -(I32_MAX - k)), lambda k: True),
    "seq_div": (lambda m, k: m.seq_div(1, 0, -1, 3), lambda k: True),
    "seq_rm_top": (lambda m, k: m.seq_rm(1, I32_MAX - k, -1), None),
    "seq_rm_all": (lambda m, k: m.seq_rm(1, -1, -1), lambda k: True),
    "seq_cp": (lambda m, k: m.seq_cp(1, 3), None),
    "seq_keep": (lambda m, k: m.seq_keep(1), lambda k: True),
    "seq_pos": (lambda m, k: (m.seq_pos_min(1), m.seq_pos_max(1)), lambda k: True),
    "state_round_trip_seq": (lambda m, k: m.state_read(m.state_write(1), 1), None),
    "state_seq_into_other": (lambda m, k: m.state_read(m.state_write(1), 3), None),
    "state_round_trip_whole": (lambda m, k: m.state_read(m.state_write(-1)), lambda k: True),
    "update": (lambda m, k: [None for _ in m.init_update()], lambda k: True),
}


def shiftable(kind):
    return MEMORIES[kind]().get_can_shift()


# every kind: an iSWA pair whose caches differ in size reports get_can_shift() False (llama.cpp's
# rule for the K-shift), but its positions still move with seq_add
CASES = [(kind, k, op) for kind in KINDS for k in (0, 1, 2, 5) for op in OPERATIONS]


@pytest.mark.parametrize("kind, k, op", CASES, ids=[f"{a}-k{b}-{c}" for a, b, c in CASES])
def test_int32_limit_table(kind, k, op):
    mem = at_limit(kind, k)
    call, must_of = OPERATIONS[op]
    must = None if must_of is None or must_of(k) is None else (lambda k, v=must_of(k): v)
    before = snapshot(mem)
    try:
        result = call(mem, k)
    except ALLOWED as e:
        assert not isinstance(e, UnicodeError)
        assert must is None or not must(k), f"{op} at INT32_MAX - {k} was refused: {e!r}"
        assert snapshot(mem) == before
        return
    if isinstance(result, Status) and result != Status.SUCCESS:
        assert snapshot(mem) == before
        assert must is None or not must(k)
        return
    assert must is None or must(k), f"{op} at INT32_MAX - {k} was accepted"
    # nothing wrapped: every held position of every sequence is in [0, INT32_MAX] and the
    # queries agree with the cells
    for seq in range(4):
        lo, hi = mem.seq_pos_min(seq), mem.seq_pos_max(seq)
        assert -1 <= lo <= I32_MAX and -1 <= hi <= I32_MAX
        assert (lo == -1) == (hi == -1) or hasattr(mem, "mem_recr")
    for kctx_cache in kv_caches(mem):
        assert kctx_cache._core.check_invariants()
        pos = kctx_cache.cells()["pos"]
        assert (pos >= -1).all()


def kv_caches(mem):
    if isinstance(mem, (HybridMemory, HybridISWAMemory)):
        return kv_caches(mem.mem_attn)
    if isinstance(mem, KVCacheISWA):
        return [mem.base, mem.swa]
    return [mem] if hasattr(mem, "_core") else []


def test_int32_table_covers_every_shiftable_kind():
    assert {kind for kind, _, _ in CASES} == set(KINDS)
    assert len(CASES) == len(KINDS) * 4 * len(OPERATIONS)


# -- composites check every part first -------------------------------------------------------------------

COMPOSITES = ["kv_iswa", "hybrid", "hybrid_iswa"]
SEQ_OPS = {
    "seq_rm": (0, 1, -1),
    "seq_cp": (0, 3, -1, -1),
    "seq_keep": (1,),
    "seq_add": (1, 0, -1, 4),
    "seq_div": (1, 0, -1, 2),
}


def part_checks(mem):
    """(object, its parts' check owner) pairs: every leaf memory whose _check_* a composite calls."""
    if isinstance(mem, (HybridMemory, HybridISWAMemory)):
        return part_checks(mem.mem_attn) + [mem.mem_recr]
    if isinstance(mem, KVCacheISWA):
        return [mem.base, mem.swa]
    return [mem]


class InjectedRefusal(ValueError):
    pass


COMPOSITE_CASES = [(kind, op, i) for kind in COMPOSITES for op in SEQ_OPS
                   for i in range(len(part_checks(MEMORIES[kind]())))]


@pytest.mark.parametrize("kind, op, part", COMPOSITE_CASES, ids=[f"{k}-{o}-part{p}" for k, o, p in COMPOSITE_CASES])
def test_composite_refused_by_any_part_changes_nothing(kind, op, part, monkeypatch):
    mem = filled(kind)
    leaf = part_checks(mem)[part]

    def refuse(*args):
        raise InjectedRefusal(f"{op} refused by part {part}")
    monkeypatch.setattr(leaf, f"_check_{op}", refuse, raising=False)
    before = snapshot(mem)
    with pytest.raises(InjectedRefusal):
        getattr(mem, op)(*SEQ_OPS[op])
    assert snapshot(mem) == before
    monkeypatch.undo()
    getattr(mem, op)(*SEQ_OPS[op])  # and without the injection the operation works


def test_hybrid_seq_add_overflowing_only_in_the_recurrent_part_changes_nothing():
    mem = filled("hybrid")
    mem.mem_recr.seq_add(1, 0, -1, I32_MAX - 10)  # the recurrent part alone is near the limit
    before = snapshot(mem)
    with pytest.raises(ValueError, match="int32"):
        mem.seq_add(1, 0, -1, 100)
    assert snapshot(mem) == before


def test_hybrid_iswa_seq_add_overflowing_only_in_the_swa_cache_changes_nothing():
    mem = filled("hybrid_iswa")
    mem.mem_attn.swa.seq_add(1, 0, -1, I32_MAX - 10)
    before = snapshot(mem)
    with pytest.raises(ValueError, match="int32"):
        mem.seq_add(1, 0, -1, 100)
    assert snapshot(mem) == before


def test_iswa_seq_div_refused_by_the_swa_cache_changes_nothing(monkeypatch):
    mem = filled("kv_iswa")
    before = snapshot(mem)
    with pytest.raises(ValueError):
        mem.seq_div(1, 0, -1, 0)
    assert snapshot(mem) == before


# -- contexts refuse what their state does not allow -----------------------------------------------------


def planned(mem):
    return mem.init_batch(Batch(token=np.ones(6, np.int32), seq_id=np.full(6, 3, np.int32)), 4)


def finished(mem):
    ctx = planned(mem)
    for _ in ctx:
        pass
    return ctx


def failed(mem):
    ctx = mem.init_batch(Batch(token=np.ones(300, np.int32), seq_id=np.full(300, 3, np.int32)), 8)
    if ctx.status == Status.SUCCESS:
        pytest.skip("the batch fits")
    return ctx


def full(mem):
    return mem.init_full()


def writes(mem, ctx):
    """Every write a context offers: K/V rows and recurrent states, with well-formed values."""
    out = []
    for kctx, cache in kv_parts(mem, ctx):
        il = cache.layers[0]
        out.append(("cpy_k", lambda kctx=kctx, il=il: kctx.cpy_k(il, np.ones((1, 8), np.float32))))
        out.append(("cpy_v", lambda kctx=kctx, il=il: kctx.cpy_v(il, np.ones((1, 8), np.float32))))
    for rctx, memory in recurrent_parts(mem, ctx):
        il = next(i for i in range(memory.n_layer) if memory.has_layer(i))
        w = memory.s(il).shape[1]
        out.append(("store_s", lambda rctx=rctx, il=il, w=w, dt=memory.dtype_s:
                    rctx.store_s(il, np.ones((1, w), dt))))
    return out


STATES = {"planned": planned, "finished": finished, "failed": failed, "full": full}
CONTEXT_CASES = [(kind, state) for kind in KINDS for state in STATES]


@pytest.mark.parametrize("kind, state", CONTEXT_CASES, ids=[f"{k}-{s}" for k, s in CONTEXT_CASES])
def test_context_writes_refused_unless_applied(kind, state):
    mem = filled(kind)
    ctx = STATES[state](mem)
    before = snapshot(mem)
    for name, write in writes(mem, ctx):
        if state in ("planned", "failed", "full") and name in ("cpy_k", "cpy_v"):
            with pytest.raises(LlmemError):
                write()
        elif state in ("planned", "failed") and name == "store_s":
            with pytest.raises(LlmemError):
                write()
        else:
            try:
                write()
            except ALLOWED:
                pass
        if name != "store_s" or state in ("planned", "failed"):
            assert snapshot(mem) == before, f"{name} on a {state} context changed the memory"


@pytest.mark.parametrize("kind, state", [(k, s) for k in KINDS for s in ("finished", "failed")])
def test_finished_or_failed_context_cannot_apply(kind, state):
    mem = filled(kind)
    ctx = STATES[state](mem)
    before = snapshot(mem)
    with pytest.raises(LlmemError):
        ctx.apply()
    with pytest.raises(LlmemError):
        list(ctx)
    assert snapshot(mem) == before


@pytest.mark.parametrize("kind", KINDS)
def test_next_past_the_end_stays_false_and_changes_nothing(kind):
    mem = filled(kind)
    ctx = finished(mem)
    before = snapshot(mem)
    assert not ctx.next()
    assert not ctx.next()
    assert snapshot(mem) == before


# -- state readers: every malformed header is a StateError --------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [8, 12, 16, 20, 24, 28, 32, 40, 44, 45, 46, 47, 48])
@pytest.mark.parametrize("value", [0x00, 0x80, 0xFF, 0x27])
def test_header_field_damage_is_a_state_error(kind, offset, value):
    import struct
    import zlib
    from llmem import STATE_HEADER

    mem = filled(kind)
    blob = bytearray(mem.state_write(-1, STATE_HEADER))
    blob[offset] = value
    config = struct.unpack_from("<I", blob, 28)[0]
    end = 44 + config
    if end + 4 <= len(blob):
        struct.pack_into("<I", blob, end, zlib.crc32(bytes(blob[:end])))  # a crafted file's CRC
    before = snapshot(mem)
    try:
        mem.state_read(bytes(blob), -1, STATE_HEADER)
    except StateError as e:
        str(e).encode("utf-8")
        assert snapshot(mem) == before
    # (an unchanged byte, or one the header does not check, may read fine)


# found by the API fuzzer: a composite context whose sub-context was applied on its own
# (ctx.swa.apply(), ctx.recr.apply()) applied its other part, then refused the second


@pytest.mark.parametrize("kind, sub", [("kv_iswa", "swa"), ("kv_iswa", "base"), ("hybrid", "recr"),
                                       ("hybrid", "attn"), ("hybrid_iswa", "recr"), ("hybrid_iswa", "attn")])
def test_composite_context_with_a_sub_context_applied_alone_refuses_unchanged(kind, sub):
    mem = filled(kind)
    ctx = mem.init_batch(Batch(token=[1, 1], seq_id=[3, 3]), 4)
    getattr(ctx, sub).apply()
    before = snapshot(mem)
    with pytest.raises(LlmemError):
        ctx.apply()
    assert snapshot(mem) == before
