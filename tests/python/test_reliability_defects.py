"""Issue 20: regression tests for the ten defects a hostile black-box test found (each failed before
its fix). The class-wide tests (int32 tables, composite checks, context states) are in
test_reliability_classes.py; the data race (defect 1) is caught by the ThreadSanitizer run of
test_threads.py and the C++ test KvContext.DestroyedOnAnotherThreadWhilePlanning."""

import copy
import struct
import threading
import zlib

import numpy as np
import pytest

from llmem import (STATE_HEADER, Batch, BatchAllocator, BatchError, KVCache, KVCacheISWA, LlmemError,
                   RecurrentMemory, StateError, Status, SWAType)
from memory_zoo import MEMORIES, decode, filled, snapshot

I32_MAX = 2**31 - 1


def iswa():
    return KVCacheISWA(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=64, n_seq_max=2, n_swa=4,
                       swa_type=SWAType.STANDARD, is_swa_layer=[True, False], n_ubatch=8)


# -- 2. KVCacheISWA.seq_add half-applied --------------------------------------------------------------


def test_iswa_seq_add_overflowing_only_in_the_swa_cache_changes_neither():
    mem = iswa()
    assert decode(mem, 0, 3) == Status.SUCCESS
    mem.seq_add(0, 0, -1, I32_MAX - 10)
    high_swa = mem.state_write(0, flags=1)  # PARTIAL_ONLY: the swa section only
    mem.seq_rm(0)
    assert decode(mem, 0, 3) == Status.SUCCESS
    mem.state_read(high_swa, 0, flags=1)  # base holds 0..2, swa MAX-10..MAX-8
    assert mem.base.seq_pos_max(0) == 2 and mem.swa.seq_pos_max(0) == I32_MAX - 8
    before = snapshot(mem)
    with pytest.raises(ValueError, match="overflows int32"):
        mem.seq_add(0, 0, -1, 100)
    assert snapshot(mem) == before
    assert mem.base.seq_pos_max(0) == 2


# -- 3. automatic positions wrap int32 ---------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MEMORIES))
def test_automatic_position_after_int32_max_is_a_batch_error(kind):
    mem = MEMORIES[kind]()
    assert decode(mem, 1, 1) == Status.SUCCESS
    mem.seq_add(1, 0, -1, I32_MAX)
    assert mem.seq_pos_max(1) == I32_MAX
    before = snapshot(mem)
    for batch in (Batch(token=[1], seq_id=[1]), Batch(token=[1, 1], seq_id=[1, 1])):
        with pytest.raises(BatchError, match="int32") as err:
            mem.init_batch(batch, 8)
        assert err.value.reason == "POS_OVERFLOW"
    assert snapshot(mem) == before
    assert mem.seq_pos_max(1) == I32_MAX


def test_automatic_positions_of_a_long_batch_stop_at_int32_max():
    mem = MEMORIES["kv"]()
    assert decode(mem, 1, 1) == Status.SUCCESS
    mem.seq_add(1, 0, -1, I32_MAX - 3)  # at MAX - 3: three more positions fit, not four
    ok = mem.init_batch(Batch(token=[1, 1, 1], seq_id=[1, 1, 1]), 8)
    assert ok.status == Status.SUCCESS
    with pytest.raises(BatchError, match="int32"):
        mem.init_batch(Batch(token=[1, 1, 1, 1], seq_id=[1, 1, 1, 1]), 8)


# -- 4. state_read of a sequence holding a cell at INT32_MAX into a full cache ------------------------


def test_sequence_state_read_with_a_cell_at_int32_max_into_a_full_cache_is_a_state_error():
    mem = KVCache(n_layer=1, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=2, n_seq_max=2)
    assert decode(mem, 0, 1) == Status.SUCCESS
    mem.seq_add(0, 0, -1, I32_MAX)
    assert decode(mem, 1, 1) == Status.SUCCESS  # the cache is full
    blob = mem.state_write(0)
    before = snapshot(mem)
    # removing [0, -1) keeps the cell at INT32_MAX (llama.cpp's half-open range), so the read
    # has no room for the restored cell
    with pytest.raises(StateError):
        mem.state_read(blob, 0)
    assert snapshot(mem) == before


# -- 5. a headered state with a non-UTF-8 configuration field ------------------------------------------


def _recrc_header(blob: bytearray) -> bytes:
    config_bytes = struct.unpack_from("<I", blob, 28)[0]
    end = 44 + config_bytes
    struct.pack_into("<I", blob, end, zlib.crc32(bytes(blob[:end])))
    return bytes(blob)


@pytest.mark.parametrize("kind", sorted(MEMORIES))
def test_non_utf8_configuration_field_name_is_a_state_error(kind, tmp_path):
    mem = filled(kind)
    blob = bytearray(mem.state_write(-1, STATE_HEADER))
    blob[45] = 0xFF  # first byte of the first field's name
    bad = _recrc_header(blob)
    before = snapshot(mem)
    with pytest.raises(StateError, match=r"\\xff"):
        mem.state_read(bad, -1, STATE_HEADER)
    path = tmp_path / "state.llmem"
    path.write_bytes(bad)
    with pytest.raises(StateError):
        mem.load(path)
    assert snapshot(mem) == before


# -- 6. a finished RecurrentContext re-applies its last micro-batch ------------------------------------


@pytest.mark.parametrize("kind", sorted(MEMORIES))
def test_finished_context_refuses_to_run_again(kind):
    mem = filled(kind)
    ctx = mem.init_batch(Batch(token=np.ones(6, np.int32), seq_id=np.full(6, 3, np.int32)), 4)
    n = 0
    for _ in ctx:
        n += 1
    assert n >= 1
    before = snapshot(mem)
    with pytest.raises(LlmemError):
        for _ in ctx:
            pass
    with pytest.raises(LlmemError):
        ctx.apply()
    assert snapshot(mem) == before
    assert mem.seq_pos_max(3) == 5


@pytest.mark.parametrize("kind", sorted(MEMORIES))
def test_applying_the_same_micro_batch_twice_is_refused(kind):
    mem = filled(kind)
    ctx = mem.init_batch(Batch(token=[1, 1], seq_id=[3, 3]), 4)
    assert ctx.apply()
    before = snapshot(mem)
    with pytest.raises(LlmemError):
        ctx.apply()
    assert snapshot(mem) == before


# -- 7. copy.copy(memory) -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MEMORIES))
def test_memories_and_contexts_cannot_be_shallow_copied(kind):
    mem = filled(kind)
    for obj in (mem, mem.init_batch(Batch(token=[1], seq_id=[3]), 8), mem.init_full()):
        with pytest.raises(TypeError, match="cannot be copied"):
            copy.copy(obj)
        with pytest.raises(TypeError):
            copy.deepcopy(obj)


# -- 8. K/V writes through a context that has not applied ----------------------------------------------


@pytest.mark.parametrize("kind", ["kv", "kv_streams", "kv_iswa", "hybrid", "hybrid_iswa"])
def test_kv_writes_before_apply_are_refused(kind):
    mem = filled(kind)
    attn = mem.mem_attn if hasattr(mem, "mem_attn") else mem
    il = attn.layers[0]
    rows = np.ones((2, 8), np.float32)
    planned = mem.init_batch(Batch(token=[1, 1], seq_id=[3, 3]), 8)
    full = mem.init_full()
    before = snapshot(mem)
    for ctx in (planned, full):
        kctx = ctx.attn if hasattr(ctx, "attn") else ctx
        for write in (kctx.cpy_k, kctx.cpy_v):
            with pytest.raises(LlmemError, match="apply"):
                write(il, rows)
    assert snapshot(mem) == before


# -- 9. a position source that re-enters BatchAllocator.init -------------------------------------------


class ReenteringSource:
    def __init__(self, balloc, swallow):
        self.balloc, self.swallow, self.calls = balloc, swallow, 0

    def seq_pos_min(self, seq_id):
        return -1

    def seq_pos_max(self, seq_id):
        self.calls += 1
        try:
            self.balloc.init(Batch(token=[7] * 5, seq_id=[0] * 5))
        except LlmemError:
            if not self.swallow:
                raise
        return -1


@pytest.mark.parametrize("swallow", [False, True])
def test_reentering_the_allocator_from_a_position_source_keeps_the_outer_batch(swallow):
    balloc = BatchAllocator(4)
    balloc.init(Batch(token=[1, 2, 3], seq_id=[1, 1, 1]))
    src = ReenteringSource(balloc, swallow)
    outer = Batch(token=[4, 5], seq_id=[2, 2])
    if swallow:
        balloc.init(outer, src)
        assert balloc.n_tokens == 2  # the outer batch, not the inner one or the one before
    else:
        with pytest.raises(LlmemError, match="re-entered"):
            balloc.init(outer, src)
        assert balloc.n_tokens == 3  # unchanged: the batch from before
    assert src.calls >= 1


# -- 10. a position source returning a non-int ---------------------------------------------------------


class BadSource:
    def __init__(self, value):
        self.value = value

    def seq_pos_min(self, seq_id):
        return self.value

    def seq_pos_max(self, seq_id):
        return self.value


@pytest.mark.parametrize("value, exc", [("3", TypeError), (1.5, TypeError), (None, TypeError),
                                        (2**40, ValueError), (-2**40, ValueError), (True, TypeError)])
def test_position_source_returning_a_bad_value_names_it(value, exc):
    balloc = BatchAllocator(4)
    balloc.init(Batch(token=[1], seq_id=[0]))
    with pytest.raises(exc, match="seq_pos_max") as err:
        balloc.init(Batch(token=[1], seq_id=[0]), BadSource(value))
    assert repr(value)[:8] in str(err.value)
    assert balloc.n_tokens == 1


def test_position_source_returning_numpy_ints_works():
    balloc = BatchAllocator(4)
    balloc.init(Batch(token=[1], seq_id=[0]), BadSource(np.int64(4)))
    assert balloc.n_tokens == 1


# -- 1. context destruction racing a planning thread (behaviour; TSan checks the race itself) ----------


def test_contexts_dropped_on_other_threads_while_planning():
    mem = KVCache(n_layer=1, n_embd_k_gqa=4, n_embd_v_gqa=4, kv_size=256, n_seq_max=4)
    batch = Batch(token=np.ones(4, np.int32), seq_id=np.zeros(4, np.int32))
    stop = threading.Event()
    held = []
    errors = []

    def planner():
        try:
            for _ in range(300):
                with mem.lock:
                    held.append(mem.init_batch(batch, 2))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            stop.set()

    def dropper():
        while not stop.is_set():
            while held:
                try:
                    held.pop()
                except IndexError:
                    break

    threads = [threading.Thread(target=planner)] + [threading.Thread(target=dropper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    held.clear()
    ctx = mem.init_batch(batch, 2)
    for _ in ctx:
        pass
    assert mem.seq_pos_max(0) == 3
