"""Issue 8, atomic failure: every operation that can fail, on every memory type, is refused with
the memory exactly as it was (state bytes, cell metadata, used count, every buffer), and the memory
keeps working afterwards.

Each row of FAILURES names a failing operation: ``prepare(mem)`` brings the memory to the point
where the operation is attempted (a context planned or applied, states gathered) and returns
what ``attempt(mem, prepared)`` needs; the snapshot is taken between the two. ``outcome`` is the
exception the attempt raises, or a predicate on its return value for the refusals llama.cpp
reports by value (``seq_rm`` -> False, a batch that does not fit -> FAILED_PREPARE).
"""

import dataclasses
from typing import Any, Callable

import numpy as np
import pytest

from llmem import (Batch, BatchError, KVCache, KVCacheISWA, RecurrentMemory, StaleContextError, StateError,
                   Status)
from memory_zoo import MEMORIES, N_SEQ, decode, filled, kv_parts, recurrent_parts, snapshot

KINDS = sorted(MEMORIES)


def has_kv(mem):
    return isinstance(mem, (KVCache, KVCacheISWA)) or hasattr(mem, "mem_attn")


def has_recurrent(mem):
    return isinstance(mem, RecurrentMemory) or hasattr(mem, "mem_recr")


def always(mem):
    return True


def multi_stream(mem):
    return isinstance(mem, KVCache) and mem.n_stream > 1


@dataclasses.dataclass
class Failure:
    name: str
    applies: Callable[[Any], bool]
    attempt: Callable[[Any, Any], Any]
    outcome: Any                      # an exception class, or a predicate on the return value
    prepare: Callable[[Any], Any] = lambda mem: None


def applied_context(mem, seq_id=3, n_tokens=2):
    """A context whose first micro-batch is placed but whose rows are not written yet."""
    ctx = mem.init_batch(Batch(token=np.ones(n_tokens, np.int32), seq_id=np.full(n_tokens, seq_id, np.int32)), 8)
    assert ctx.apply()
    return ctx


def gathered_context(mem):
    """An applied context whose input states were gathered (the graph's reads, which move rows)."""
    ctx = applied_context(mem)
    for rctx, memory in recurrent_parts(mem, ctx):
        for il in range(memory.n_layer):
            if memory.has_layer(il):
                rctx.get_r(il)
                rctx.get_s(il)
    return ctx


def first_kv(mem, ctx):
    kctx, cache = kv_parts(mem, ctx)[0]
    return kctx, cache.layers[0]


def first_recurrent(mem, ctx):
    rctx, memory = recurrent_parts(mem, ctx)[0]
    il = next(il for il in range(memory.n_layer) if memory.has_layer(il))
    return rctx, il, memory.s(il).shape[1], memory.s(il).dtype


def stale_context(mem):
    """A plan made before another call changed the memory."""
    ctx = mem.init_batch(Batch(token=np.ones(2, np.int32), seq_id=np.full(2, 3, np.int32)), 8)
    assert decode(mem, 0, 1) == Status.SUCCESS
    return ctx


def store_s(bad):
    def attempt(mem, ctx):
        rctx, il, width, dtype = first_recurrent(mem, ctx)
        rctx.store_s(il, bad(width, dtype))
    return attempt


def cpy(which, bad):
    def attempt(mem, ctx):
        kctx, il = first_kv(mem, ctx)
        getattr(kctx, which)(il, bad)
    return attempt


def is_false(result):
    return result is False


def failed_prepare(result):
    return result.status == Status.FAILED_PREPARE


FAILURES = [
    # invalid batches (BatchError from the allocator, before any planning)
    Failure("batch_seq_id_too_large", always, lambda m, _: m.init_batch(Batch(token=[1], seq_id=[N_SEQ]), 8),
            BatchError),
    Failure("batch_negative_seq_id", always, lambda m, _: m.init_batch(Batch(token=[1], seq_id=[-1]), 8),
            BatchError),
    Failure("batch_positions_go_back", always,
            lambda m, _: m.init_batch(Batch(token=[1, 1], pos=[7, 6], seq_id=[3, 3]), 8), BatchError),
    Failure("batch_empty", always, lambda m, _: m.init_batch(Batch(token=np.zeros(0, np.int32)), 8), BatchError),
    Failure("batch_entry_without_sequence", always,
            lambda m, _: m.init_batch(Batch(token=[1, 1], seq_id=[[3], []]), 8), BatchError),
    # no room: llama.cpp's FAILED_PREPARE, with nothing placed
    Failure("cache_full", lambda m: not isinstance(m, RecurrentMemory),
            lambda m, _: m.init_batch(Batch(token=np.ones(200, np.int32), seq_id=np.full(200, 3, np.int32)), 8),
            failed_prepare),
    Failure("recurrent_token_in_two_sequences", lambda m: isinstance(m, RecurrentMemory),
            lambda m, _: m.init_batch(Batch(token=[1], seq_id=[[3, 2]]), 8), failed_prepare,
            lambda m: m.seq_rm(2, -1, -1)),
    # refused sequence operations
    Failure("seq_rm_cut_without_rollback", has_recurrent, lambda m, _: m.seq_rm(1, 1, -1), is_false),
    Failure("seq_add_overflows_int32", always, lambda m, _: m.seq_add(1, 0, -1, 2**31 - 3), ValueError),
    Failure("seq_div_by_zero", always, lambda m, _: m.seq_div(1, 0, -1, 0), ValueError),
    Failure("seq_cp_part_of_a_stream", multi_stream, lambda m, _: m.seq_cp(1, 3, 1, 3), ValueError),
    Failure("seq_id_not_an_int", always, lambda m, _: m.seq_rm("1"), TypeError),
    Failure("seq_cp_destination_out_of_range", lambda m: not isinstance(m, RecurrentMemory),
            lambda m, _: m.seq_cp(0, N_SEQ), ValueError),
    Failure("n_ubatch_zero", always, lambda m, _: m.init_batch(Batch(token=[1], seq_id=[3]), 0), ValueError),
    # bad state bytes (for a hybrid a truncated tail is the half failure: the attention section
    # reads, the recurrent one does not)
    Failure("state_truncated", always, lambda m, _: m.state_read(m.state_write(-1)[:-1]), StateError),
    Failure("state_trailing_bytes", always, lambda m, _: m.state_read(m.state_write(-1) + b"\0"), StateError),
    Failure("state_garbage", always, lambda m, _: m.state_read(b"\xff" * 64), StateError),
    Failure("sequence_state_truncated", always, lambda m, _: m.state_read(m.state_write(1)[:-2], 3), StateError),
    Failure("state_not_bytes", always, lambda m, _: m.state_read("state"), TypeError),
    Failure("state_truncated_numpy_view", always,
            lambda m, _: m.state_read(np.frombuffer(m.state_write(1), np.uint8)[:-2], 3), StateError),
    Failure("state_non_contiguous", always,
            lambda m, _: m.state_read(np.frombuffer(m.state_write(-1) * 2, np.uint8)[::2]), TypeError),
    Failure("state_write_into_too_small", always, lambda m, _: m.state_write_into(bytearray(8)), ValueError),
    Failure("state_write_into_read_only", always, lambda m, _: m.state_write_into(bytes(1 << 16)), TypeError),
    Failure("state_read_seq_id_out_of_range", always, lambda m, _: m.state_read(m.state_write(1), 10**6),
            ValueError),
    # a stale plan: another call changed the memory after init_batch
    Failure("apply_stale_context", always, lambda m, ctx: ctx.apply(), StaleContextError, stale_context),
    # wrong dtype / shape / layout of a buffer passed in
    Failure("cpy_k_int_dtype", has_kv, cpy("cpy_k", np.zeros((2, 8), np.int32)), TypeError, applied_context),
    Failure("cpy_k_complex_dtype", has_kv, cpy("cpy_k", np.zeros((2, 8), np.complex64)), TypeError,
            applied_context),
    Failure("cpy_k_wrong_width", has_kv, cpy("cpy_k", np.zeros((2, 7), np.float32)), ValueError, applied_context),
    Failure("cpy_k_wrong_token_count", has_kv, cpy("cpy_k", np.zeros((3, 8), np.float32)), ValueError,
            applied_context),
    Failure("cpy_k_not_an_array", has_kv, cpy("cpy_k", "rows"), ValueError, applied_context),
    Failure("cpy_v_int_dtype", has_kv, cpy("cpy_v", np.zeros((2, 8), np.int64)), TypeError, applied_context),
    Failure("cpy_v_wrong_shape", has_kv, cpy("cpy_v", np.zeros((8, 2), np.float32)), ValueError, applied_context),
    Failure("cpy_v_flat", has_kv, cpy("cpy_v", np.zeros(16, np.float32)), ValueError, applied_context),
    Failure("store_s_wrong_dtype", has_recurrent, store_s(lambda w, dt: np.zeros((1, w), np.float64)), TypeError,
            gathered_context),
    Failure("store_s_wrong_width", has_recurrent, store_s(lambda w, dt: np.zeros((1, w + 1), dt)), ValueError,
            gathered_context),
    Failure("store_s_wrong_rows", has_recurrent, store_s(lambda w, dt: np.zeros((2, w), dt)), ValueError,
            gathered_context),
    Failure("store_s_non_contiguous", has_recurrent, store_s(lambda w, dt: np.zeros((1, 2 * w), dt)[:, ::2]),
            ValueError, gathered_context),
    Failure("store_s_list", has_recurrent, store_s(lambda w, dt: [[0.0] * w]), TypeError, gathered_context),
    Failure("store_s_too_many_planes", has_recurrent, store_s(lambda w, dt: np.zeros((9, 1, w), dt)), ValueError,
            gathered_context),
    Failure("store_r_wrong_layer", has_recurrent,
            lambda m, ctx: recurrent_parts(m, ctx)[0][0].store_r(99, np.zeros((1, 4), np.float32)), ValueError,
            gathered_context),
]

CASES = [(kind, f) for kind in KINDS for f in FAILURES if f.applies(MEMORIES[kind]())]


def test_every_memory_type_has_cases():
    assert {kind for kind, _ in CASES} == set(KINDS)
    assert len(CASES) >= 150


@pytest.mark.parametrize("kind, failure", CASES, ids=[f"{k}-{f.name}" for k, f in CASES])
def test_refused_operation_changes_nothing(kind, failure):
    mem = filled(kind)
    prepared = failure.prepare(mem)
    before = snapshot(mem)
    if isinstance(failure.outcome, type):
        with pytest.raises(failure.outcome):
            failure.attempt(mem, prepared)
    else:
        assert failure.outcome(failure.attempt(mem, prepared))
    assert snapshot(mem) == before

    # and the memory keeps working: a decode, a sequence state round trip, another sequence op
    end = mem.seq_pos_max(2)
    assert decode(mem, 2, 2, salt=0.25) == Status.SUCCESS
    assert mem.seq_pos_max(2) == end + 2
    blob = mem.state_write(2)
    mem.state_read(blob, 2)
    assert mem.state_write(2) == blob
    mem.seq_rm(0, -1, -1)
    assert mem.seq_pos_max(0) == -1
