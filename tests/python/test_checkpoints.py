"""Recurrent checkpoints (RecurrentMemory.checkpoint_*, also through the hybrids) and the refusal
of a ranged seq_cp that would pair cells with the wrong recurrent state (issue 14, items 1-2)."""

import numpy as np
import pytest

import llmem
from llmem.toy import ToyHybrid, ToyRecurrent
from toy_session import TOL, Session, random_tokens

REC = ToyRecurrent(seed=3)
HYB = ToyHybrid(seed=5)


def _rows(mem, seq):
    """Every r and s row of ``seq``'s current state (plane 0: no rollback pending)."""
    cell = int(mem.cells()["tail"][seq])
    return [mem.r(il)[cell].copy() for il in range(mem.n_layer) if mem.has_layer(il)] + \
           [mem.s(il)[cell].copy() for il in range(mem.n_layer) if mem.has_layer(il)]


def test_save_then_restore_into_another_sequence_continues_exactly():
    rng = np.random.default_rng(1)
    v = REC.config.n_vocab
    s = Session(REC, REC.new_memory(n_seq_max=3))
    s.feed({0: random_tokens(rng, 7, v)})
    mem = s.memory
    ck = mem.checkpoint_save(0)
    assert mem.checkpoint_pos(ck) == 6
    saved = _rows(mem, 0)
    s.feed({0: random_tokens(rng, 4, v)})           # the source moves on
    mem.seq_rm(0, -1, -1)                            # and goes away: the checkpoint outlives it
    assert mem.checkpoint_restore(ck, 2) == 6
    assert mem.seq_pos_max(2) == 6 and mem.seq_pos_min(2) == 6
    for a, b in zip(_rows(mem, 2), saved):
        np.testing.assert_array_equal(a, b)
    s.tokens[2], s.pos[2], s.outputs[2] = s.tokens[0][:7], s.pos[0][:7], []
    s.feed({2: random_tokens(rng, 5, v)})
    s.check()
    assert len(s.outputs[2]) == 5
    # restored twice: the checkpoint stays in the pool until dropped
    assert mem.checkpoint_restore(ck, 1) == 6
    assert mem.checkpoint_drop(ck) is True and mem.checkpoint_drop(ck) is False
    assert mem.checkpoint_stats()["count"] == 0


def test_checkpoint_of_a_pending_rollback_is_the_snapshot():
    rng = np.random.default_rng(2)
    v = REC.config.n_vocab
    s = Session(REC, REC.new_memory(n_seq_max=2, n_rs_seq=2))
    s.feed({0: random_tokens(rng, 6, v)})
    assert s.seq_rm_tail(0, 4)                       # roll back to position 3
    ck = s.memory.checkpoint_save(0)
    assert s.memory.checkpoint_pos(ck) == 3
    s.memory.checkpoint_restore(ck, 1)
    s.tokens[1], s.pos[1], s.outputs[1] = s.tokens[0][:], s.pos[0][:], []
    s.feed({1: random_tokens(rng, 3, v)})
    s.check()


def test_pool_limits_by_count_and_bytes():
    mem = REC.new_memory(n_seq_max=2)
    mem.set_checkpoint_limits(max_count=2)
    rng = np.random.default_rng(3)
    Session(REC, mem).feed({0: random_tokens(rng, 3, REC.config.n_vocab)})
    one = mem.checkpoint_stats()["checkpoint_bytes"]
    assert one == sum(mem.r(il)[0].nbytes + mem.s(il)[0].nbytes for il in range(mem.n_layer))
    a, b = mem.checkpoint_save(0), mem.checkpoint_save(0)
    with pytest.raises(llmem.LlmemError, match="pool full"):
        mem.checkpoint_save(0)
    assert mem.checkpoint_stats()["count"] == 2 and mem.checkpoint_stats()["bytes"] == 2 * one
    mem.checkpoint_drop(a)
    c = mem.checkpoint_save(0)                       # the slot is reused
    assert c not in (a, b)
    mem.set_checkpoint_limits(max_count=10, max_bytes=2 * one)
    assert not mem.checkpoint_has_room()
    mem.checkpoint_clear()
    assert mem.checkpoint_has_room() and mem.checkpoint_stats()["count"] == 0


def test_bad_calls_change_nothing():
    mem = REC.new_memory(n_seq_max=2)
    rng = np.random.default_rng(4)
    Session(REC, mem).feed({0: random_tokens(rng, 3, REC.config.n_vocab), 1: random_tokens(rng, 2, 32)})
    before = mem.cells()
    with pytest.raises(ValueError, match="no state"):
        REC.new_memory(n_seq_max=2).checkpoint_save(0)
    ck = mem.checkpoint_save(0)
    with pytest.raises(ValueError, match="already holds a state"):
        mem.checkpoint_restore(ck, 1)
    with pytest.raises(ValueError, match="no checkpoint with id"):
        mem.checkpoint_restore(ck + 1, 1)
    with pytest.raises(ValueError, match="cannot hold a state"):
        mem.checkpoint_restore(ck, 5)
    with pytest.raises(TypeError):
        mem.checkpoint_save("0")
    after = mem.cells()
    for k in ("pos", "src", "tail"):
        np.testing.assert_array_equal(before[k], after[k])
    assert before["seq_ids"] == after["seq_ids"]


def test_hybrid_restore_needs_the_attention_side_at_the_checkpoint():
    rng = np.random.default_rng(5)
    v = HYB.config.n_vocab
    s = Session(HYB, HYB.new_memory(64, 3))
    s.feed({0: random_tokens(rng, 10, v)})
    mem = s.memory
    ck = mem.checkpoint_save(0)
    s.feed({0: random_tokens(rng, 5, v)})
    with pytest.raises(ValueError, match="would not pair"):
        mem.checkpoint_restore(ck, 1)                # the attention side of 1 is empty
    assert mem.mem_recr.seq_pos_max(1) == -1
    mem.mem_attn.seq_cp(0, 1, 0, 10)                 # the prefix's cells, shared
    assert mem.checkpoint_restore(ck, 1) == 9
    s.tokens[1], s.pos[1], s.outputs[1] = s.tokens[0][:10], s.pos[0][:10], []
    s.feed({1: random_tokens(rng, 4, v), 0: random_tokens(rng, 2, v)})
    s.check()


# -- issue 14's wrong-logits scenario: a ranged seq_cp on a hybrid --------------------------------

def test_ranged_seq_cp_on_a_hybrid_is_refused_and_changes_nothing():
    rng = np.random.default_rng(6)
    v = HYB.config.n_vocab
    s = Session(HYB, HYB.new_memory(64, 2))
    s.feed({0: random_tokens(rng, 30, v)})
    mem = s.memory
    before = mem.cells()
    # positions 0..9 of the attention cells with the state after position 29: the next decode
    # of sequence 1 would be wrong (llama.cpp does it silently)
    with pytest.raises(ValueError, match="last position 29"):
        mem.seq_cp(0, 1, 0, 10)
    after = mem.cells()
    np.testing.assert_array_equal(before["attn"]["pos"], after["attn"]["pos"])
    assert mem.seq_pos_max(1) == -1 and mem.mem_recr.seq_pos_max(1) == -1
    # a range ending at the last position is fine, and decodes exactly
    s.seq_cp(0, 1, 30)
    s.feed({1: random_tokens(rng, 3, v)})
    s.check()


def test_what_the_refused_copy_would_have_computed_is_wrong():
    # the scenario, done by hand on the parts: the logits differ from forward_full, which is
    # why the hybrid refuses it
    rng = np.random.default_rng(6)
    v = HYB.config.n_vocab
    mem = HYB.new_memory(64, 2)
    toks = random_tokens(rng, 30, v)
    HYB.decode(llmem.Batch(token=np.array(toks, np.int32), seq_id=np.zeros(30, np.int32)), mem)
    mem.mem_attn.seq_cp(0, 1, 0, 10)
    mem.mem_recr.seq_cp(0, 1, -1, -1)
    nxt = random_tokens(rng, 1, v)
    got = HYB.decode(llmem.Batch(token=np.array(nxt, np.int32), seq_id=np.ones(1, np.int32)), mem)
    ref = HYB.forward_full(list(toks[:10]) + list(nxt))[-1]
    assert not np.allclose(got[0], ref, **TOL)


@pytest.mark.parametrize("p0, p1", [(0, 10), (0, 29), (30, -1), (5, 6)])
def test_ranged_seq_cp_on_a_recurrent_memory_is_refused(p0, p1):
    rng = np.random.default_rng(7)
    mem = REC.new_memory(n_seq_max=2)
    Session(REC, mem).feed({0: random_tokens(rng, 30, REC.config.n_vocab)})
    with pytest.raises(ValueError, match="wrong state"):
        mem.seq_cp(0, 1, p0, p1)
    assert mem.seq_pos_max(1) == -1


@pytest.mark.parametrize("p0, p1", [(-1, -1), (0, 30), (29, -1), (0, 100), (-1, 30)])
def test_ranges_reaching_the_last_position_copy(p0, p1):
    rng = np.random.default_rng(7)
    mem = REC.new_memory(n_seq_max=2)
    Session(REC, mem).feed({0: random_tokens(rng, 30, REC.config.n_vocab)})
    mem.seq_cp(0, 1, p0, p1)
    assert mem.seq_pos_max(1) == 29
