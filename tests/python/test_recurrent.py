"""RecurrentMemory through the public Python API: the spec's worked examples and tricky cases
(section 5.11, cases 22-38), the state gather/store path, and argument checking."""

from __future__ import annotations

import numpy as np
import pytest

import llmem
from llmem import LlmemError, RecurrentMemory, Status

# -- helpers ---------------------------------------------------------------------------------------


def make_batch(entries):
    """entries: list of (ids, pos); ids an int or a list attached in that order."""
    seq_id = [[e[0]] if isinstance(e[0], int) else list(e[0]) for e in entries]
    pos = np.array([e[1] for e in entries], dtype=np.int32)
    token = np.zeros(len(entries), dtype=np.int32)
    return llmem.Batch(token=token, pos=pos, seq_id=seq_id)


def decode(mem, entries, n_ubatch=512, embd_all=False):
    """Decode as llama.cpp does: init_batch, then apply each ubatch and read all of s_copy.
    Returns (status, [(seq ids per set, s_copy) per ubatch])."""
    ctx = mem.init_batch(make_batch(entries), n_ubatch, embd_all)
    if ctx.status != Status.SUCCESS:
        return ctx.status, []
    out = []
    for ub in ctx:
        sets = [tuple(ub.seq_id_list[s * ub.n_seq_tokens]) for s in range(ub.n_seqs)]
        out.append((sets, ctx.s_copy_all().tolist()))
    return ctx.status, out


def run(mem, seq, p0, p1):
    status, ubs = decode(mem, [(seq, p) for p in range(p0, p1)])
    assert status == Status.SUCCESS
    return ubs


def cell_ids(mem):
    return mem.cells()["seq_ids"]


def memory(size=4, n_seq_max=4, n_rs_seq=0, n_layer=1, n_embd_r=2, n_embd_s=3, **kw):
    # the spec's cases are llama.cpp b11312's (test_compat.py covers b11549's rules)
    kw.setdefault("compat", "b11312")
    return RecurrentMemory(n_layer, n_embd_r, n_embd_s, mem_size=size, n_seq_max=n_seq_max, n_rs_seq=n_rs_seq,
                           **kw)


# -- construction ---------------------------------------------------------------------------------


def test_construction_allocates_zeroed_planes_per_present_layer():
    mem = RecurrentMemory(3, [2, 4, 6], 5, mem_size=4, n_seq_max=2, n_rs_seq=2, dtype_s=np.float16,
                          layer_filter=lambda il: il != 1)
    assert mem.r(0).shape == (12, 2) and mem.r(2).shape == (12, 6)
    assert mem.s(0).shape == (12, 5) and mem.s(0).dtype == np.float16 and mem.r(0).dtype == np.float32
    assert not mem.r(0).any() and not mem.s(2).any()
    assert mem.has_layer(0) and not mem.has_layer(1)
    with pytest.raises(ValueError, match="il=1"):
        mem.r(1)
    with pytest.raises(ValueError, match="il=3"):
        mem.s(3)
    assert mem.memory_breakdown() == {"r": 12 * (2 + 6) * 4, "s": 12 * 5 * 2 * 2}
    assert (mem.size, mem.n_seq_max, mem.n_rs_seq, mem.n_layer) == (4, 2, 2, 3)
    assert mem.get_can_shift() is True
    assert isinstance(mem, llmem.Memory)


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(n_layer=0), ValueError, "n_layer"),
    (dict(n_layer=1.5), TypeError, "n_layer"),
    (dict(mem_size=0), ValueError, "mem_size"),
    (dict(n_seq_max=0), ValueError, "n_seq_max"),
    (dict(n_rs_seq=-1), ValueError, "n_rs_seq"),
    (dict(n_embd_r=-2), ValueError, "n_embd_r"),
    (dict(n_embd_s=[1, 2]), ValueError, "n_embd_s"),
    (dict(dtype_r=np.int32), TypeError, "dtype_r"),
    (dict(dtype_s="float64"), TypeError, "dtype_s"),
    (dict(layer_filter=[True, False]), ValueError, "layer_filter"),
    (dict(n_seq_max=True), TypeError, "n_seq_max"),
])
def test_construction_refuses_bad_arguments(kwargs, exc, name):
    args = dict(n_layer=1, n_embd_r=2, n_embd_s=2, mem_size=4, n_seq_max=4)
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        RecurrentMemory(**args)


# -- find_slot through decoding (spec 5.11) -------------------------------------------------------


def test_example_a_copy_then_unshare():
    mem = memory()
    assert run(mem, 0, 0, 3) == [([(0,)], [0])]
    mem.seq_cp(0, 1, -1, -1)
    assert cell_ids(mem)[0] == (0, 1) and mem.used == 1 and mem.seq_pos_max(1) == 2
    assert run(mem, 1, 3, 4) == [([(1,)], [0])]  # tricky 25
    c = mem.cells()
    assert cell_ids(mem)[:2] == [(0,), (1,)]
    assert c["pos"][:2].tolist() == [2, 3] and c["src0"][1] == 0
    assert (mem.head, mem.rs_z, mem.used, mem.n) == (1, 1, 2, 1)
    assert run(mem, 0, 3, 4) == [([(0,)], [0])]
    assert (mem.head, mem.rs_z) == (0, -1)


def test_example_b_tricky_26_permutation_in_one_ubatch():
    mem = memory()
    for s in (2, 0, 1):
        run(mem, s, 0, 1)
    status, ubs = decode(mem, [(1, 1), (2, 1)])
    assert ubs == [([(1,), (2,)], [2, 0, 1])]
    assert (mem.head, mem.n, mem.rs_z) == (0, 3, -1)
    assert cell_ids(mem)[:3] == [(1,), (2,), (0,)]
    # listing seq 2 before seq 1 gives two ubatches (sequential split)
    status, ubs = decode(mem, [(2, 2), (1, 2)])
    assert [sets for sets, _ in ubs] == [[(2,)], [(1,)]]


def test_example_c_tricky_31_coupled_tokens_need_embd_all():
    mem = memory()
    entries = [([0, 1], 0), ([0, 1], 1)]
    status, _ = decode(mem, entries)
    assert status == Status.FAILED_PREPARE
    assert mem.used == 0
    status, ubs = decode(mem, entries, embd_all=True)
    assert status == Status.SUCCESS and len(ubs) == 1
    assert cell_ids(mem)[0] == (0, 1) and mem.seq_pos_max(0) == mem.seq_pos_max(1) == 1
    status, ubs = decode(mem, [(0, 2), (1, 2)])
    assert ubs == [([(0,), (1,)], [0, 0])]
    assert mem.rs_z == 1
    assert cell_ids(mem)[:2] == [(0,), (1,)]


def test_example_d_tricky_30_head_reset():
    mem = memory(size=8, n_seq_max=8)
    for s in range(6):
        run(mem, s, 0, 1)
    for s in range(5):
        mem.seq_cp(6, s, -1, -1)
    assert (mem.used, mem.head) == (1, 5)
    run(mem, 7, 0, 1)
    assert cell_ids(mem)[0] == (7,) and mem.head == 0


def test_tricky_24_sequence_id_beyond_size_fails_prepare():
    mem = memory(size=2, n_seq_max=4)
    status, _ = decode(mem, [(3, 0)])
    assert status == Status.FAILED_PREPARE
    assert mem.seq_rm(3, -1, -1) is False
    assert mem.used == 0


def test_shared_token_over_diverged_states_is_refused():
    # deviation R14: seqs 0 and 1 sit at the same position with different states; a token carrying
    # both would keep one state for both (llama.cpp drops seq 1's silently). llmem refuses it.
    mem = memory()
    run(mem, 0, 0, 2)
    run(mem, 1, 0, 2)
    before = mem.cells(), mem.used, mem.head
    status, _ = decode(mem, [([0, 1], 2)], embd_all=True)
    assert status == Status.FAILED_PREPARE
    after = mem.cells(), mem.used, mem.head
    for k in ("pos", "src", "src0", "tail"):
        np.testing.assert_array_equal(before[0][k], after[0][k])
    assert before[0]["seq_ids"] == after[0]["seq_ids"] and before[1:] == after[1:]
    # after seq 1 takes seq 0's state the shared token is accepted
    mem.seq_rm(1, -1, -1)
    mem.seq_cp(0, 1)
    status, _ = decode(mem, [([0, 1], 2)], embd_all=True)
    assert status == Status.SUCCESS
    assert mem.seq_pos_max(0) == mem.seq_pos_max(1) == 2 and (0, 1) in cell_ids(mem)


def test_failed_prepare_changes_nothing():
    mem = memory(size=2, n_seq_max=4)
    run(mem, 0, 0, 1)
    run(mem, 1, 0, 1)
    mem.seq_cp(1, 0)
    before = mem.cells(), mem.used, mem.head
    # seq 0 would be un-shared by the first ubatch; seq 3 makes the second fail
    ctx = mem.init_batch(make_batch([(0, 1), (3, 0)]), 1)
    assert ctx.status == Status.FAILED_PREPARE and ctx.ubatch is None
    after = mem.cells(), mem.used, mem.head
    for k in ("pos", "src", "src0", "tail"):
        np.testing.assert_array_equal(before[0][k], after[0][k])
    assert before[0]["seq_ids"] == after[0]["seq_ids"] and before[1:] == after[1:]
    with pytest.raises(LlmemError):
        ctx.apply()
    with pytest.raises(LlmemError):
        list(ctx)


def test_tricky_32_33_context_protocol():
    mem = memory()
    ctx = mem.init_batch(make_batch([(0, 0), (1, 0), (0, 1), (1, 1)]), 2)
    assert ctx.n_ubatches == 2
    assert ctx.apply() is True
    assert ctx.next() is True
    assert ctx.apply() is True
    assert ctx.next() is False
    assert mem.seq_pos_max(0) == mem.seq_pos_max(1) == 1
    assert mem.init_update().status == Status.NO_UPDATE
    assert mem.init_update(optimize=True).status == Status.NO_UPDATE
    assert llmem.status_combine(Status.SUCCESS, Status.NO_UPDATE) == Status.SUCCESS
    full = mem.init_full()
    assert full.status == Status.SUCCESS and full.ubatch is None
    assert (full.n_rs, full.head, full.rs_z) == (4, 0, 0)
    assert full.apply() is True and full.next() is False
    assert full.s_copy_all().shape == (4,)


def test_full_context_s_copy_reads_cells_from_zero_whatever_the_head():
    mem = memory()
    for s in range(3):
        run(mem, s, 0, 1)
    assert mem.head == 2
    full = mem.init_full()
    # llama.cpp reads cell k + head here, past the end of its cells for k >= 2 (deviation)
    assert full.s_copy_all().tolist() == mem.cells()["src0"].tolist()


# -- sequence operations --------------------------------------------------------------------------


def test_tricky_22_seq_rm_ranges():
    mem = memory()
    run(mem, 0, 0, 5)
    assert mem.seq_rm(0, 2, -1) is False and mem.seq_pos_max(0) == 4
    assert mem.seq_rm(0, 0, 3) is True and mem.seq_pos_max(0) == 4
    assert mem.seq_rm(0, 5, -1) is True and mem.seq_pos_max(0) == 4
    assert mem.seq_rm(0, 0, 5) is True and mem.seq_pos_max(0) == -1
    assert mem.used == 0


def test_tricky_23_seq_rm_refusals():
    mem = memory()
    run(mem, 0, 0, 2)
    assert mem.seq_rm(-1, -1, -1) is False and mem.seq_pos_max(0) == 1
    assert mem.seq_rm(4, -1, -1) is False
    assert mem.seq_rm(1, -1, -1) is True
    assert mem.seq_rm(0) is True and mem.seq_pos_max(0) == -1


def test_tricky_27_28_shared_cell_copy_and_shift():
    mem = memory()
    run(mem, 0, 0, 10)
    run(mem, 1, 0, 4)
    with pytest.raises(ValueError, match="wrong state"):  # deviation R16: llama.cpp ignores the range
        mem.seq_cp(0, 2, 100, 200)
    mem.seq_cp(0, 2, 0, 200)
    assert mem.seq_pos_max(2) == 9 and mem.seq_pos_min(2) == 9
    mem.seq_add(0, 0, 5, 3)
    assert mem.seq_pos_max(0) == 9
    mem.seq_add(0, 0, 10, 3)
    assert mem.seq_pos_max(0) == mem.seq_pos_max(2) == 12
    mem.seq_div(2, -1, -1, 5)
    assert mem.seq_pos_max(0) == 2
    with pytest.raises(ValueError, match="d must not be 0"):
        mem.seq_div(0, -1, -1, 0)


def test_tricky_29_negative_position_used_drift():
    mem = memory()
    run(mem, 0, 0, 1)
    run(mem, 1, 0, 2)
    mem.seq_add(1, -1, -1, -5)
    # llama.cpp's maximum starts at -1: min -4, max -1 (oracle README C1; the spec says -4)
    assert mem.seq_pos_min(1) == -4 and mem.seq_pos_max(1) == -1 and mem.used == 2
    mem.seq_keep(2)
    occupied = sum(1 for ids in cell_ids(mem) if ids)
    assert mem.used == occupied + 1


def test_seq_keep_and_clear():
    mem = memory()
    run(mem, 0, 0, 3)
    run(mem, 1, 0, 2)
    mem.seq_keep(1)
    assert mem.seq_pos_max(0) == -1 and mem.seq_pos_max(1) == 1 and mem.used == 1
    mem.s(0)[:] = 1
    mem.clear(data=False)
    assert mem.used == 0 and mem.seq_pos_max(1) == -1 and mem.s(0).all()
    mem.clear()
    assert not mem.s(0).any()


@pytest.mark.parametrize("call, exc, name", [
    (lambda m: m.seq_rm("0"), TypeError, "seq_id"),
    (lambda m: m.seq_rm(0, 1.0), TypeError, "p0"),
    (lambda m: m.seq_rm(0, 0, 2**31), ValueError, "p1"),
    (lambda m: m.seq_cp(0, None), TypeError, "seq_id_dst"),
    (lambda m: m.seq_add(0, 0, 1, 2**40), ValueError, "shift"),
    (lambda m: m.seq_div(0, 0, 1, True), TypeError, "d"),
    (lambda m: m.seq_pos_max(-2**31 - 1), ValueError, "seq_id"),
    (lambda m: m.seq_keep([1]), TypeError, "seq_id"),
    (lambda m: m.init_batch(make_batch([(0, 0)]), 0), ValueError, "n_ubatch"),
    (lambda m: m.init_batch(make_batch([(0, 0)]), 2**40), ValueError, "n_ubatch"),
    (lambda m: m.init_batch(make_batch([(0, 0)]), 4.0), TypeError, "n_ubatch"),
    (lambda m: m.init_batch([1, 2], 4), TypeError, "balloc_or_batch"),
    (lambda m: m.state_write(-2), ValueError, "seq_id"),
    (lambda m: m.state_write(4), ValueError, "seq_id"),
    (lambda m: m.state_write(0, 8), ValueError, "flags"),
    (lambda m: m.state_read(b"", 9), ValueError, "seq_id"),
    (lambda m: m.state_read("text"), TypeError, "data"),
    (lambda m: m.state_read(12), TypeError, "data"),
    (lambda m: m.state_read(np.zeros(3, np.float32)), ValueError, "bytes-like"),
])
def test_bad_arguments_raise_and_change_nothing(call, exc, name):
    mem = memory()
    run(mem, 0, 0, 3)
    before = mem.state_write()
    with pytest.raises(exc, match=name):
        call(mem)
    assert mem.state_write() == before


def test_numpy_integers_are_accepted():
    mem = memory()
    run(mem, 0, 0, 3)
    assert mem.seq_pos_max(np.int64(0)) == 2
    assert mem.seq_rm(np.int32(0), np.int16(-1), -1) is True


# -- rollback (spec 5.13) --------------------------------------------------------------------------


def test_tricky_34_35_rollback_once_then_pending_then_consumed():
    mem = memory(size=2, n_seq_max=2, n_rs_seq=2)
    run(mem, 0, 0, 5)
    run(mem, 1, 0, 3)
    assert mem.seq_rm(0, 4, -1) is True and mem.seq_pos_max(0) == 3 and mem.rs_idx()[0] == 1
    assert mem.seq_rm(0, 3, -1) is False
    assert mem.seq_rm(1, 1, -1) is True and mem.rs_idx()[1] == 2 and mem.seq_pos_max(1) == 0
    assert run(mem, 0, 4, 5) == [([(0,)], [2])]
    assert mem.rs_idx().tolist() == [0, 2]
    assert mem.seq_rm(1, 0, -1) is True and mem.rs_idx()[1] == 0


def test_tricky_36_rollback_limit():
    mem = memory(n_rs_seq=2)
    run(mem, 0, 0, 5)
    assert mem.seq_rm(0, 1, -1) is False and mem.seq_pos_max(0) == 4
    assert mem.seq_rm(0, 3, 10) is True and mem.seq_pos_max(0) == 2 and mem.rs_idx()[0] == 2


def test_tricky_37_38_shared_rollback():
    mem = memory(size=3, n_seq_max=3, n_rs_seq=2)
    run(mem, 1, 0, 4)
    mem.seq_cp(1, 0, -1, -1)
    assert mem.seq_rm(1, 3, -1) is True and mem.seq_pos_max(0) == 2
    with pytest.raises(LlmemError, match="rollback"):
        mem.state_write(-1)
    assert run(mem, 0, 3, 4) == [([(0,)], [0])]
    assert mem.rs_idx()[1] == 1


def test_rollback_split_keeps_the_tail_together():
    mem = memory(n_rs_seq=2)
    ctx = mem.init_batch(make_batch([(0, p) for p in range(5)]), 4)
    # keep_tail = 3: the first ubatch stops early so the last 3 tokens stay together
    assert [ub.n_tokens for ub in ctx] == [2, 3]
    with pytest.raises(ValueError):
        mem.init_batch(make_batch([(0, 0)]), 3)  # n_ubatch <= keep_tail


# -- state gather / store (the computation contract of 5.12) --------------------------------------


def step(mem, entries, new_value=None, embd_all=False):
    """Decode and, for every ubatch, read the input s states and store new ones; returns inputs."""
    ctx = mem.init_batch(make_batch(entries), 512, embd_all)
    assert ctx.status == Status.SUCCESS
    inputs = []
    for ub in ctx:
        sets = [ub.seq_id_list[s * ub.n_seq_tokens][0] for s in range(ub.n_seqs)]
        s_in = ctx.get_s(0)
        inputs.append(dict(zip(sets, s_in.tolist())))
        if new_value is not None:
            new = np.array([[new_value(q)] * s_in.shape[1] for q in sets], dtype=s_in.dtype)
            ctx.store_s(0, new)
    return inputs


def state_of(mem, seq):
    return mem.s(0)[mem.cells()["tail"][seq]].tolist()


def test_new_sequences_start_from_zero_and_states_follow_their_sequences():
    mem = memory(n_embd_s=2)
    assert step(mem, [(2, 0)], lambda q: 20.0) == [{2: [0.0, 0.0]}]
    assert step(mem, [(0, 0)], lambda q: 10.0) == [{0: [0.0, 0.0]}]
    assert step(mem, [(1, 0)], lambda q: 11.0) == [{1: [0.0, 0.0]}]
    # example B: the permutation moves seq 0's untouched state along with its cell
    assert step(mem, [(1, 1), (2, 1)], lambda q: 100.0 + q) == [{1: [11.0, 11.0], 2: [20.0, 20.0]}]
    assert state_of(mem, 0) == [10.0, 10.0]
    assert state_of(mem, 1) == [101.0, 101.0]
    assert state_of(mem, 2) == [102.0, 102.0]


def test_a_copied_sequence_starts_from_the_shared_state():
    mem = memory(n_embd_s=2)
    step(mem, [(0, 0), (0, 1)], lambda q: 7.0)
    mem.seq_cp(0, 1)
    assert step(mem, [(1, 2)], lambda q: 8.0) == [{1: [7.0, 7.0]}]
    assert state_of(mem, 0) == [7.0, 7.0] and state_of(mem, 1) == [8.0, 8.0]
    # coupled tokens, then divergence in one ubatch (example C): both start from the shared state
    mem2 = memory(n_embd_s=1)
    step(mem2, [([0, 1], 0), ([0, 1], 1)], lambda q: 5.0, embd_all=True)
    assert step(mem2, [(0, 2), (1, 2)], lambda q: float(q)) == [{0: [5.0], 1: [5.0]}]
    assert state_of(mem2, 0) == [0.0] and state_of(mem2, 1) == [1.0]


def test_store_of_snapshot_planes_and_rollback_reads_them():
    mem = memory(size=2, n_seq_max=2, n_rs_seq=2, n_embd_s=1)
    ctx = mem.init_batch(make_batch([(0, p) for p in range(3)]), 8)
    for ub in ctx:
        ctx.get_s(0)
        ctx.store_s(0, np.array([[[30.0]], [[20.0]], [[10.0]]], dtype=np.float32))  # planes 0, 1, 2
    assert mem.s(0)[[0, 2, 4], 0].tolist() == [30.0, 20.0, 10.0]
    assert mem.seq_rm(0, 1, -1) is True  # roll back 2 tokens: plane 2
    assert step(mem, [(0, 1)], lambda q: 21.0) == [{0: [10.0]}]
    assert mem.rs_idx()[0] == 0


def test_get_and_store_refusals():
    mem = memory(n_layer=2, layer_filter=[True, False])
    ctx = mem.init_batch(make_batch([(0, 0), (1, 0)]), 8)
    with pytest.raises(LlmemError, match="apply"):
        ctx.get_s(0)
    with pytest.raises(LlmemError, match="apply"):
        ctx.s_copy(0)
    ctx.apply()
    s_in = ctx.get_s(0)
    assert s_in.shape == (2, 3)
    assert ctx.get_s(0) is s_in  # evaluated once per ubatch
    assert ctx.get_r(0).shape == (2, 2)
    with pytest.raises(ValueError, match="il=1"):
        ctx.get_s(1)
    with pytest.raises(TypeError, match="float32"):
        ctx.store_s(0, np.zeros((2, 3), np.float64))
    with pytest.raises(ValueError, match="shape"):
        ctx.store_s(0, np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        ctx.store_r(0, np.zeros((2, 2, 2), np.float32))  # n_rs_seq = 0: one plane only
    with pytest.raises(TypeError):
        ctx.store_r(0, [[0.0, 0.0]])
    with pytest.raises(ValueError, match="contiguous"):
        ctx.store_s(0, np.zeros((3, 2), np.float32).T)
    with pytest.raises(ValueError, match="il=-1"):
        ctx.get_s(-1)
    with pytest.raises(TypeError, match="il"):
        ctx.get_r("0")
    assert ctx.get_s(np.int64(0)) is s_in
    with pytest.raises(ValueError, match="i="):
        ctx.s_copy(2)
    assert ctx.s_copy(1) == ctx.s_copy_all()[1]
    with pytest.raises(LlmemError):
        mem.init_full().get_s(0)


def test_float16_states():
    mem = memory(dtype_r=np.float16, dtype_s=np.float16, n_embd_s=2)
    ctx = mem.init_batch(make_batch([(0, 0)]), 8)
    for ub in ctx:
        assert ctx.get_s(0).dtype == np.float16
        ctx.store_s(0, np.full((1, 2), 1.5, np.float16))
    assert mem.s(0)[0].tolist() == [1.5, 1.5]


def test_save_and_load(tmp_path):
    mem = memory()
    run(mem, 0, 0, 3)
    mem.s(0)[0] = 4.0
    mem.save(tmp_path / "m.bin")
    other = memory()
    other.load(tmp_path / "m.bin")
    assert other.seq_pos_max(0) == 2 and other.s(0)[0].tolist() == [4.0] * 3
    mem.save(tmp_path / "seq0.bin", seq_id=0)
    other.load(tmp_path / "seq0.bin", seq_id=3)
    assert other.seq_pos_max(3) == 2 and other.state_write(3) == mem.state_write(0)
