"""The failure model a scheduler acts on (README "When a call cannot do its job"):
StateError.reason, the no-room report of a failed plan, interleaved plans, overlap scheduling."""

import struct
import threading

import numpy as np
import pytest

import llmem
from llmem import Batch, KVCache, KVCacheISWA, NoRoom, StaleContextError, StateError, Status, SWAType

EMBD = 8


def kv(size=8, n_seq_max=4, unified=True, embd=EMBD, **kw):
    return KVCache(n_layer=1, n_embd_k_gqa=embd, n_embd_v_gqa=embd, kv_size=size, n_seq_max=n_seq_max,
                   unified=unified, **kw)


def fill(mem, seq_ids, n_ubatch=64):
    """Decode one batch (seq ids per token) through ``mem``, writing K/V rows of 1s."""
    ctx = mem.init_batch(Batch(token=np.zeros(len(seq_ids), np.int32), seq_id=np.array(seq_ids, np.int32)),
                         n_ubatch)
    assert ctx.status == Status.SUCCESS, ctx.no_room
    for ub in ctx:
        ctx.cpy_k(0, np.ones((ub.n_tokens, EMBD), np.float16))
        ctx.cpy_v(0, np.ones((ub.n_tokens, EMBD), np.float16))
    return ctx


def plan(mem, seq_ids, n_ubatch=64):
    return mem.init_batch(Batch(token=np.zeros(len(seq_ids), np.int32), seq_id=np.array(seq_ids, np.int32)),
                          n_ubatch)


# -- StateError.reason ------------------------------------------------------------------------------

def test_state_error_reasons_are_documented():
    assert StateError("x").reason == "CORRUPT"
    assert set(StateError.REASONS) == {"NO_ROOM", "CORRUPT", "CONFIG_MISMATCH", "VERSION"}


def test_state_read_no_room_says_so_and_changes_nothing():
    src = kv(size=16)
    fill(src, [0] * 6)
    blob = src.state_write(0)
    dst = kv(size=8)
    fill(dst, [1] * 5)
    before = dst.cells()
    with pytest.raises(StateError) as info:
        dst.state_read(blob, 0)
    assert info.value.reason == "NO_ROOM"
    assert dst.used == 5 and np.array_equal(dst.cells()["pos"], before["pos"])
    dst.seq_rm(1)
    dst.state_read(blob, 0)  # room made: the same bytes now restore
    assert dst.seq_pos_max(0) == 5


def test_state_read_corrupt():
    src = kv()
    fill(src, [0] * 3)
    blob = src.state_write(0)
    with pytest.raises(StateError) as info:
        kv().state_read(blob[:-5], 0)
    assert info.value.reason == "CORRUPT"


def test_state_read_configuration_mismatch():
    src = kv()
    fill(src, [0] * 3)
    with pytest.raises(StateError) as info:
        kv(embd=16).state_read(src.state_write(0), 0)
    assert info.value.reason == "CONFIG_MISMATCH"
    # the versioned header names the mismatch before any payload is read
    with pytest.raises(StateError) as info:
        kv(size=16).state_read(src.state_write(0, llmem.STATE_HEADER), 0, llmem.STATE_HEADER)
    assert info.value.reason == "CONFIG_MISMATCH" and "kv_size" in str(info.value)


def test_state_file_version(tmp_path):
    src = kv()
    fill(src, [0] * 3)
    path = tmp_path / "s.llmem"
    src.save(path, 0)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, struct.unpack_from("<I", data, 8)[0] + 1)
    path.write_bytes(bytes(data))
    with pytest.raises(StateError) as info:
        kv().load(path, 0)
    assert info.value.reason == "VERSION"


def test_recurrent_state_configuration_mismatch():
    def rec(n_embd_s):
        return llmem.RecurrentMemory(n_layer=1, n_embd_r=4, n_embd_s=n_embd_s, mem_size=2, n_seq_max=2)
    with pytest.raises(StateError) as info:
        rec(16).state_read(rec(8).state_write(), -1)
    assert info.value.reason == "CONFIG_MISMATCH"


# -- the no-room report -----------------------------------------------------------------------------

def test_no_room_names_the_sequences_to_preempt():
    cache = kv(size=8)
    fill(cache, [0] * 5)                          # 3 cells free
    ctx = plan(cache, [1, 1, 2, 2, 3])           # needs 5: seq 1 fits, then one token of seq 2
    assert ctx.status == Status.FAILED_PREPARE
    assert ctx.no_room == NoRoom(seq_ids=(2, 3), cells_missing=2, memory="kv")
    # preempting exactly those makes the rest fit
    assert plan(cache, [1, 1]).status == Status.SUCCESS
    # freeing cells_missing cells instead works too
    cache.seq_rm(0, 3, -1)
    assert plan(cache, [1, 1, 2, 2, 3]).status == Status.SUCCESS


def test_no_room_per_stream():
    cache = kv(size=4, n_seq_max=3, unified=False)
    fill(cache, [0, 0, 0, 1, 1])                  # stream 0: 1 free, stream 1: 2 free, stream 2: 4
    ctx = plan(cache, [0, 0, 1, 2, 2, 2])
    assert ctx.status == Status.FAILED_PREPARE
    assert ctx.no_room == NoRoom(seq_ids=(0,), cells_missing=1, memory="kv")


def test_no_room_is_none_on_success_and_for_other_failures():
    cache = kv(size=8)
    assert plan(cache, [0, 1]).no_room is None
    rec = llmem.RecurrentMemory(n_layer=1, n_embd_r=4, n_embd_s=4, mem_size=1, n_seq_max=2)
    ctx = rec.init_batch(Batch(token=np.zeros(1, np.int32), seq_id=np.array([1], np.int32)), 8)
    assert ctx.status == Status.FAILED_PREPARE and ctx.no_room is None  # seq id >= mem_size


def test_no_room_iswa_names_the_full_cache():
    mem = KVCacheISWA(n_layer=2, n_embd_k_gqa=EMBD, n_embd_v_gqa=EMBD, kv_size=8, n_seq_max=2,
                      n_swa=2, swa_type=SWAType.STANDARD, n_ubatch=4, is_swa_layer=[False, True])
    ctx = mem.init_batch(Batch(token=np.zeros(10, np.int32), seq_id=np.zeros(10, np.int32)), 4)
    assert ctx.status == Status.FAILED_PREPARE
    assert ctx.no_room.memory == "kv" and ctx.no_room.seq_ids == (0,) and ctx.no_room.cells_missing == 2


def test_no_room_hybrid_reports_the_attention_part():
    attn = kv(size=4, n_seq_max=2)
    recr = llmem.RecurrentMemory(n_layer=1, n_embd_r=4, n_embd_s=4, mem_size=2, n_seq_max=2)
    mem = llmem.HybridMemory(attn, recr, is_recurrent_layer=[False])
    ctx = mem.init_batch(Batch(token=np.zeros(6, np.int32), seq_id=np.array([0, 0, 0, 1, 1, 1], np.int32)), 8)
    assert ctx.status == Status.FAILED_PREPARE
    assert ctx.no_room == NoRoom(seq_ids=(0, 1), cells_missing=2, memory="kv") or \
        ctx.no_room.cells_missing == 2


# -- plans interleaved in one thread, and the overlap pattern ------------------------------------

def test_interleaved_plans_in_one_thread_say_so():
    cache = kv(size=16)
    a = plan(cache, [0, 0])
    b = plan(cache, [1, 1])          # planned on the same free cells as a
    a.apply()
    with pytest.raises(StaleContextError, match="Plans cannot be interleaved"):
        b.apply()
    assert cache.used == 2 and cache.seq_pos_max(1) == -1


def _step_rows(step, n):
    return np.full((n, EMBD), step + 1, np.float16)


def test_overlap_scheduling_plan_next_step_while_the_model_runs():
    """Step N is applied, its model (a thread standing in for the GPU) writes K/V through step
    N's context while the scheduler plans step N+1; step N+1 is applied after the model is done.
    The cells and K/V bytes equal those of the same steps run one after the other."""
    steps = [[0, 0, 0, 1, 1], [0, 1], [0, 1], [1], [0, 1]]

    def sequential():
        cache = kv(size=32, n_seq_max=2)
        for n, seq_ids in enumerate(steps):
            ctx = plan(cache, seq_ids)
            for ub in ctx:
                ctx.cpy_k(0, _step_rows(n, ub.n_tokens))
                ctx.cpy_v(0, _step_rows(n, ub.n_tokens))
        return cache

    cache = kv(size=32, n_seq_max=2)
    ctx = plan(cache, steps[0])
    assert ctx.apply()
    for n in range(len(steps)):
        model = threading.Thread(target=lambda c=ctx, n=n: (c.cpy_k(0, _step_rows(n, c.ubatch.n_tokens)),
                                                            c.cpy_v(0, _step_rows(n, c.ubatch.n_tokens))))
        model.start()
        # while the model runs: plan the next step (positions continue from the applied step)
        nxt = plan(cache, steps[n + 1]) if n + 1 < len(steps) else None
        model.join()
        if nxt is not None:
            assert nxt.status == Status.SUCCESS
            assert nxt.apply()
            ctx = nxt
    ref = sequential()
    assert np.array_equal(cache.cells()["pos"], ref.cells()["pos"])
    assert np.array_equal(cache.k(0), ref.k(0)) and np.array_equal(cache.v(0), ref.v(0))
    assert cache.stats()["tokens_placed"] == sum(map(len, steps))
