"""Tests of the pure-Python batch-allocator reference against the spec's own statements.

Every test names the statement of ``spec/batch_recurrent_hybrid.md`` it checks: a section and step
(``§3.12``), a worked example (``§4.4 ex. "..."``) or a tricky case (``§10.n``). The values asserted
are the ones the spec gives. These tests check the reference itself; ``test_batch_model.py``
compares llmem with it.
"""

import pytest

from reference.ref_batch import FakeMemory, RefBatchAllocator, RefBatchError, RefUBatch

EMB = [0.5, -0.5]  # an embedding row (width 2)


def entries_batch(entries, P=1, embd=False, token=True):
    """Build init() kwargs from [(ids, pos), ...]; ids an int or a list in attach order."""
    seq_id = [[e[0]] if isinstance(e[0], int) else list(e[0]) for e in entries]
    n = len(entries)
    kw = {"seq_id": seq_id}
    if token:
        kw["token"] = [1] * n
    if embd:
        kw["embd"] = [list(EMB) for _ in range(n)]
    if token:
        kw["pos"] = [e[1] for e in entries]
    else:
        # embedding-only: temporal section = given position, other sections 0
        kw["pos"] = [e[1] for e in entries] + [0] * ((P - 1) * n)
    return kw


def make(entries, n_seq_max=4, P=1, memory=None, output=None, output_all=False, **kw):
    a = RefBatchAllocator(n_seq_max, n_vocab=kw.pop("n_vocab", 32), n_pos_per_embd=P)
    args = entries_batch(entries, P=P, **kw)
    if output is not None:
        args["output"] = output
    a.init(memory=memory, output_all=output_all, **args)
    return a


def reason_of(fn):
    with pytest.raises(RefBatchError) as ei:
        fn()
    return ei.value.reason


def reject(entries, **kw):
    return reason_of(lambda: make(entries, **kw))


def drain(split):
    """Call a split function until it returns an empty ubatch; list of batch_idx lists."""
    out = []
    while True:
        ub = split()
        if ub.n_tokens == 0:
            return out
        out.append(ub.batch_idx)


def seqs(n_per_seq, order):
    """Entries of each sequence in `order`, positions 0..n-1, sequences one after the other."""
    return [(s, p) for s in order for p in range(n_per_seq[s] if isinstance(n_per_seq, dict)
                                                 else n_per_seq)]


# =============================================================================================
# §1.6 / §10.21: order of the ids of one entry


def test_s1_6_and_s10_21_id_order_is_reverse_attach_order():
    # {0,1}@0 lists (1, 0); {1,0}@1 lists (0, 1); {0,1,2}@2 lists (2, 1, 0)
    a = make([([0, 1], 0), ([1, 0], 1), ([0, 1, 2], 2)])
    ub = a.split_simple(8)
    assert ub.seq_id == [[1, 0], [0, 1], [2, 1, 0]]


def test_s1_6_reattaching_is_a_noop_and_s2_2_primary_is_last_non_repeat():
    # "Re-attaching an id already present changes nothing"; §2.2: the primary id is the last
    # array element that is not a repeat of an earlier one.
    a = make([([0, 1, 0], 0), ([1, 1], 1), ([2, 0, 2, 1], 1)])
    ub = a.split_simple(8)
    assert ub.seq_id == [[1, 0], [1], [1, 0, 2]]
    assert [ids[0] for ids in ub.seq_id] == [1, 1, 1]


# =============================================================================================
# §2.2: legacy conversion


def test_s2_2_default_seq_is_0_and_default_output_is_last():
    a = RefBatchAllocator(4, n_vocab=32)
    a.init(token=[3, 4, 5])
    ub = a.split_simple(8)
    assert ub.seq_id == [[0], [0], [0]]
    assert ub.pos == [0, 1, 2]          # no memory: positions start at 0
    assert ub.output == [0, 0, 1]
    assert a.n_outputs == 1
    assert a.out_ids == [2]


def test_s2_2_output_is_logits_nonzero():
    a = RefBatchAllocator(4, n_vocab=32)
    a.init(token=[3, 4, 5], output=[2, 0, 1])
    assert a.split_simple(8).output == [1, 0, 1]
    assert a.n_outputs == 2


def test_s2_2_auto_positions_continue_from_memory():
    mem = FakeMemory({0: (0, 4), 2: (3, 7)})
    a = RefBatchAllocator(4, n_vocab=32)
    a.init(token=[1, 1, 1, 1, 1], seq_id=[[0], [2], [0], [1], [2]], memory=mem)
    ub = a.split_simple(8)
    assert ub.pos == [5, 8, 6, 0, 9]   # seq 1 is empty in memory: starts at 0


def test_s2_2_only_the_first_array_ids_counter_advances():
    # entry 0 {0,1}: next_pos[0] = 0 (then 1); entry 1 {1}: next_pos[1] is still 0; entry 2 {0}: 1
    a = RefBatchAllocator(4, n_vocab=32)
    a.init(token=[1, 1, 1], seq_id=[[0, 1], [1], [0]])
    ub = a.split_simple(8)
    assert ub.pos == [0, 0, 1]
    # the counter used is the first *array* element, not the primary id (1 for entry 0 here)
    a.init(token=[1, 1, 1], seq_id=[[1, 0], [1], [0]],
           memory=FakeMemory({0: (0, 9), 1: (0, 9)}))
    assert a.split_simple(8).pos == [10, 11, 10]


def test_s2_2_embedding_only_auto_positions_fill_the_temporal_section_only():
    mem = FakeMemory({0: (0, 2)})
    a = RefBatchAllocator(4, n_pos_per_embd=4)
    a.init(embd=[EMB, EMB], memory=mem)
    ub = a.split_simple(8)
    assert ub.pos == [3, 4, 0, 0, 0, 0, 0, 0]


# =============================================================================================
# §3: init


def test_s3_2_empty_batch_rejected():
    a = RefBatchAllocator(4, n_vocab=32)
    assert reason_of(lambda: a.init(token=[])) == "EMPTY"


def test_s3_3_seq_limit():
    a = RefBatchAllocator((1 << 16) + 1, n_vocab=32)
    assert reason_of(lambda: a.init(token=[1])) == "SEQ_LIMIT"


def test_s3_4_and_s10_9_mixed_content_rejected():
    # §10.9: entry 0 token-only and entry 1 token+embedding -> false
    a = RefBatchAllocator(4, n_vocab=32)
    assert reason_of(lambda: a.init(token=[1, 2], embd=[None, EMB])) == "MIXED_CONTENT"
    # a NO_TOKEN entry among token entries
    assert reason_of(lambda: a.init(token=[1, -1])) == "MIXED_CONTENT"
    assert reason_of(lambda: a.init(token=[-1, 1], embd=[EMB, EMB])) == "MIXED_CONTENT"


def test_s3_4_neither_token_nor_embedding_rejected():
    a = RefBatchAllocator(4, n_vocab=32)
    assert reason_of(lambda: a.init(token=[-1, -1])) == "NO_CONTENT"


def test_s3_4_token_and_embedding_on_every_entry_allowed():
    a = RefBatchAllocator(4, n_vocab=32)
    a.init(token=[1, 2], embd=[EMB, [1.0, 2.0]])
    ub = a.split_simple(8)
    assert ub.token == [1, 2]
    assert ub.embd == [EMB, [1.0, 2.0]]
    assert ub.pos == [0, 1]


def test_s3_5_and_s10_9_invalid_token_rejected():
    a = RefBatchAllocator(4, n_vocab=32)
    # §10.9: an id forced to -7 counts as "has a token" and is then invalid
    assert reason_of(lambda: a.init(token=[-7, 2])) == "BAD_TOKEN"
    assert reason_of(lambda: a.init(token=[1, -7])) == "BAD_TOKEN"
    assert reason_of(lambda: a.init(token=[1, 32])) == "BAD_TOKEN"
    a.init(token=[0, 31])


def test_s3_5_entry_order_content_before_token():
    # step 4 (content kind) runs over all entries before step 5 (token ids)
    a = RefBatchAllocator(4, n_vocab=32)
    assert reason_of(lambda: a.init(token=[99, -1])) == "MIXED_CONTENT"


def test_s3_7_positions_layout():
    # token batches: one position per entry; embedding-only: P per entry, section-major
    a = RefBatchAllocator(4, n_pos_per_embd=4)
    a.init(embd=[EMB, EMB], pos=[0, 1, 10, 11, 20, 21, 30, 31])
    assert a.pos == [0, 1, 10, 11, 20, 21, 30, 31]
    ub = a.split_simple(8)
    assert ub.pos == [0, 1, 10, 11, 20, 21, 30, 31]
    a = RefBatchAllocator(4, n_vocab=32, n_pos_per_embd=4)
    a.init(token=[1, 2], pos=[5, 6])
    assert a.pos == [5, 6]


def test_s3_7_pos_shape_checked():
    a = RefBatchAllocator(4, n_vocab=32, n_pos_per_embd=4)
    assert reason_of(lambda: a.init(token=[1, 2], pos=[0, 1, 0, 1])) == "BAD_SHAPE"
    assert reason_of(lambda: a.init(embd=[EMB, EMB], pos=[0, 1])) == "BAD_SHAPE"
    # token check (step 5) comes before the positions (step 7), ids (step 8) after
    assert reason_of(lambda: a.init(token=[1, 99], pos=[0])) == "BAD_TOKEN"
    assert reason_of(lambda: a.init(token=[1, 2], pos=[0], seq_id=[[9], [0]])) == "BAD_SHAPE"


def test_s3_6_embedding_width_checked_after_token_ids():
    a = RefBatchAllocator(4, n_vocab=32, n_embd=3)
    assert reason_of(lambda: a.init(token=[1, 1], embd=[EMB, EMB])) == "BAD_SHAPE"
    assert reason_of(lambda: a.init(token=[-7, 1], embd=[EMB, EMB])) == "BAD_TOKEN"
    assert reason_of(lambda: a.init(embd=[[1.0, 2.0, 3.0], EMB])) == "BAD_SHAPE"
    a.init(embd=[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def test_s3_8_bad_and_missing_seq_ids():
    assert reject([(4, 0)]) == "BAD_SEQ_ID"
    assert reject([(-1, 0)]) == "BAD_SEQ_ID"
    assert reject([([0, 5], 0)]) == "BAD_SEQ_ID"
    assert reject([([], 0)]) == "NO_SEQ_ID"
    # in entry order: the first bad entry decides
    assert reject([([], 0), (7, 0)]) == "NO_SEQ_ID"
    assert reject([(7, 0), ([], 0)]) == "BAD_SEQ_ID"
    # step 5 (tokens) before step 8 (ids)
    a = RefBatchAllocator(4, n_vocab=32)
    assert reason_of(lambda: a.init(token=[99], seq_id=[[9]])) == "BAD_TOKEN"


def test_s3_9_and_s10_10_output_all():
    # §10.10: output_all, four entries none marked output -> n_outputs = 4
    a = make([(0, 0), (0, 1), (0, 2), (0, 3)], output=[0, 0, 0, 0], output_all=True)
    assert a.n_outputs == 4
    assert a.output == [1, 1, 1, 1]
    a = make([(0, 0), (0, 1), (0, 2), (0, 3)], output=[0, 1, 0, 1])
    assert a.n_outputs == 2


def test_s3_10_posset_describes_the_whole_batch_and_coupling():
    a = make([([0, 1], 3), (0, 4), (2, 7), (2, 8)])
    assert (a.batch_pos_min(0), a.batch_pos_max(0)) == (3, 4)
    assert (a.batch_pos_min(1), a.batch_pos_max(1)) == (3, 3)
    assert (a.batch_pos_min(3), a.batch_pos_max(3)) == (-1, -1)
    assert a.has_coupled
    assert a.coupled == {(0, 1)}       # coupled[a][b]: a non-primary, b primary
    a.split_simple(1)
    assert (a.batch_pos_min(2), a.batch_pos_max(2)) == (7, 8)   # not "current ubatch"
    assert not make([(0, 0), (1, 0)]).has_coupled


def test_s3_11_seq_id_unq_and_groups():
    a = make([(2, 0), ([0, 1], 0), (2, 1), ([1, 0], 1)])
    assert a.seq_id_unq == [0, 1, 2]
    assert a.groups == {frozenset({2}): [0, 2], frozenset({0, 1}): [1, 3]}


def test_s3_12_and_s10_5_continuity_with_memory():
    mem = FakeMemory({0: (0, 9)})
    make([(0, 10), (0, 11)], memory=mem)
    assert reject([(0, 11), (0, 12)], memory=mem) == "POS_NOT_CONTINUING"
    assert reject([(0, 9), (0, 10)], memory=mem) == "POS_NOT_CONTINUING"


def test_s3_12_gap_rejected_duplicates_allowed_and_s10_3():
    assert reject([(0, 0), (0, 2)]) == "POS_GAP"
    assert reject([(0, 5), (0, 7)], memory=FakeMemory({0: (0, 4)})) == "POS_GAP"
    make([(0, 0), (0, 1), (0, 1), (0, 2)])   # §10.3


def test_s10_4_sequence_may_start_anywhere_when_empty():
    make([(0, 5), (0, 6)])
    make([(0, 5), (0, 6)], memory=FakeMemory({1: (0, 3)}))   # seq 0 empty in memory


def test_s3_12_per_sequence_in_ascending_order():
    mem = FakeMemory({1: (0, 3)})
    # seq 1 (not continuing) appears first in the batch, seq 0 (gap) is checked first
    assert reject([(1, 9), (0, 0), (0, 2)], memory=mem) == "POS_GAP"
    mem = FakeMemory({0: (0, 3)})
    assert reject([(1, 0), (1, 2), (0, 9)], memory=mem) == "POS_NOT_CONTINUING"
    # within one sequence, continuity before gap
    assert reject([(0, 9), (0, 11)], memory=mem) == "POS_NOT_CONTINUING"


def test_s3_12_and_s10_7_mrope():
    mem = FakeMemory({0: (0, 9)})
    # one embedding entry, temporal 15 -> true, 9 -> true, 8 -> false
    for t, ok in ((15, True), (9, True), (8, False)):
        a = RefBatchAllocator(4, n_pos_per_embd=4)
        call = lambda: a.init(embd=[EMB], pos=[t, 1, 2, 3], memory=mem)   # noqa: E731
        if ok:
            call()
        else:
            assert reason_of(call) == "POS_NOT_CONTINUING"
    # a token entry at temporal 9 -> false; 10 and a jump to 15 -> true
    a = RefBatchAllocator(4, n_vocab=32, n_pos_per_embd=4)
    assert reason_of(lambda: a.init(token=[1], pos=[9], memory=mem)) == "POS_NOT_CONTINUING"
    a.init(token=[1], pos=[10], memory=mem)
    a.init(token=[1], pos=[15], memory=mem)
    # no gap check with M-RoPE
    a.init(token=[1, 1], pos=[0, 5])


def test_s3_13_and_s10_8_coupled_divergence():
    mem = FakeMemory({0: (0, 5), 1: (2, 5)})
    assert reject([([0, 1], 6)], memory=mem) == "COUPLED_DIVERGED"
    make([([0, 1], 6)], memory=FakeMemory({0: (0, 5), 1: (0, 5)}))
    # both empty in memory: not diverged
    make([([0, 1], 0)], memory=FakeMemory({}))
    # no memory: no check at all
    make([([0, 1], 6), (0, 7)])


def test_s3_14_and_s10_2_decreasing_positions():
    assert reject([(0, 0), (0, 2), (0, 1)]) == "POS_DECREASING"
    # a gap is found before (step 12 before step 14)
    assert reject([(0, 0), (0, 3), (0, 1)]) == "POS_GAP"
    # divergence is found before (step 13 before step 14)
    mem = FakeMemory({0: (0, 5), 1: (2, 5)})
    assert reject([([0, 1], 7), ([0, 1], 6)], memory=mem) == "COUPLED_DIVERGED"
    # per sequence: another sequence's positions do not count
    make([(0, 5), (1, 0), (0, 6), (1, 1)])


def test_s3_14_and_s10_6_negative_positions():
    assert reject([(0, -5), (0, -4)]) == "POS_DECREASING"
    make([(0, -1), (0, 0)])


def test_s3_14_and_s10_1_partial_subset_rule_never_rejects():
    make([([0, 1, 2], 0), ([0, 1], 1), ([1, 2], 1)])


def test_s3_rejected_init_keeps_previous_batch():
    a = make([(0, 0), (0, 1)])
    with pytest.raises(RefBatchError):
        a.init(token=[1], seq_id=[[9]])
    assert a.n_tokens == 2
    assert a.split_simple(8).batch_idx == [0, 1]


# =============================================================================================
# §4.1 / §4.2


def test_s4_1_and_s10_19_out_ids_and_split_reset():
    a = make([(0, 0), (0, 1), (0, 2)], output=[1, 0, 1])
    ub = a.split_simple(10)
    assert ub.batch_idx == [0, 1, 2]
    assert a.out_ids == [0, 2]
    a.split_reset()
    assert a.out_ids == []
    assert a.n_used == 0
    # the validated batch is not touched: it splits again the same way
    assert a.split_simple(10).batch_idx == [0, 1, 2]


def test_s4_2_out_ids_follow_ubatch_order():
    a = make([(0, 0), (1, 0), (0, 1), (1, 1)], output=[1, 1, 1, 1])
    ub = a.split_equal(8, False)
    assert ub.batch_idx == [0, 2, 1, 3]
    assert a.out_ids == [0, 2, 1, 3]


def test_s4_2_token_positions_broadcast_to_all_sections():
    a = RefBatchAllocator(4, n_vocab=32, n_pos_per_embd=4)
    a.init(token=[1, 2, 3], pos=[4, 5, 6])
    ub = a.split_simple(8)
    assert ub.pos == [4, 5, 6] * 4


def test_s4_2_embedding_positions_follow_their_entries():
    a = RefBatchAllocator(4, n_pos_per_embd=4)
    #          entries: 0:s0@0  1:s1@0  2:s0@1  3:s1@1
    a.init(embd=[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], seq_id=[[0], [1], [0], [1]],
           pos=[0, 0, 1, 1, 10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33])
    ub = a.split_equal(8, False)
    assert ub.batch_idx == [0, 2, 1, 3]
    assert ub.pos == [0, 1, 0, 1, 10, 12, 11, 13, 20, 22, 21, 23, 30, 32, 31, 33]
    assert ub.embd == [[0.0, 0.0], [2.0, 2.0], [1.0, 1.0], [3.0, 3.0]]
    assert ub.token is None


def test_s4_2_seq_id_unq_and_seq_idx_are_per_ubatch():
    a = make([(3, 0), (1, 0), ([2, 0], 0)])
    ub = a.split_simple(2)
    assert ub.seq_id_unq == [1, 3]
    assert ub.seq_idx == {1: 0, 3: 1}
    assert ub.n_seqs_unq == 2
    ub = a.split_simple(2)
    assert ub.seq_id_unq == [0, 2]
    assert ub.seq_id == [[0, 2]]


# =============================================================================================
# §4.3 split_simple


def test_s4_3_example():
    a = make(seqs(2, [0, 2, 1]))
    ub = a.split_simple(4)
    assert ub.batch_idx == [0, 1, 2, 3]
    assert (ub.n_tokens, ub.n_seqs, ub.n_seq_tokens, ub.equal_seqs) == (4, 4, 1, False)
    assert a.split_simple(4).batch_idx == [4, 5]
    assert a.split_simple(4).n_tokens == 0


def test_s4_3_and_s10_11_n_ubatch_zero_gives_single_entries():
    a = make([(0, 0), (0, 1)])
    assert a.split_simple(0).batch_idx == [0]
    assert a.split_simple(0).batch_idx == [1]
    assert a.split_simple(0) == RefUBatch()


def test_s4_3_later_indices_taken_without_checking_used():
    a = make([(0, 0), (1, 0), (0, 1)])
    assert a.split_seq(8).batch_idx == [0, 2]
    # without split_reset, split_simple starts at the first unused (1) and runs on into 2
    assert a.split_simple(8).batch_idx == [1, 2]


# =============================================================================================
# §4.4 split_equal


def check_groups(ub, sets):
    """§1.3: entries [s*T, (s+1)*T) belong to sequence set s."""
    T = ub.n_seq_tokens
    assert ub.n_seqs * T == ub.n_tokens
    for s, ids in enumerate(sets):
        for k in range(s * T, (s + 1) * T):
            assert set(ub.seq_id[k]) == set(ids)


def test_s4_4_ex_shorter_set_limits_rounds():
    a = make(seqs({0: 4, 1: 2}, [0, 1]))
    ub = a.split_equal(8, False, 0)
    assert ub.batch_idx == [0, 1, 4, 5]
    assert ub.pos == [0, 1, 0, 1]
    assert (ub.n_seqs, ub.n_seq_tokens, ub.equal_seqs) == (2, 2, True)
    check_groups(ub, [{0}, {1}])
    ub = a.split_equal(8, False, 0)
    assert ub.batch_idx == [2, 3]
    assert ub.pos == [2, 3]
    assert a.split_equal(8, False, 0).n_tokens == 0


def test_s4_4_ex_sequential_selection_and_s10_13():
    order = [0, 2, 1]
    a = make(seqs(2, order))
    assert drain(lambda: a.split_equal(8, True, 0)) == [[0, 1, 4, 5], [2, 3]]
    a.split_reset()
    ub = a.split_equal(8, False, 0)
    assert ub.batch_idx == [0, 1, 2, 3, 4, 5]
    assert ub.n_seqs == 3
    check_groups(ub, [{0}, {2}, {1}])
    a.split_reset()
    assert drain(lambda: a.split_equal(3, False, 0)) == [[0, 2, 4], [1, 3, 5]]


def test_s4_4_ex_more_sets_than_room_and_s10_12():
    a = make([(0, 0), (1, 0), (2, 0), (3, 0)])
    ub = a.split_equal(2, False, 0)
    assert (ub.n_tokens, ub.n_seqs) == (3, 3)
    assert ub.seq_id_unq == [0, 1, 2]
    ub = a.split_equal(2, False, 0)
    assert ub.seq_id_unq == [3]
    assert ub.n_tokens == 1


def test_s4_4_ex_overlapping_sets():
    a = make([([0, 1], 0), (0, 1), (1, 1)])
    assert a.split_equal(8, True, 0).n_tokens == 0
    assert a.n_used == 0
    assert drain(lambda: a.split_equal(8, False, 0)) == [[0], [1, 2]]


def test_s10_14_coupled_batch():
    a = make([([0, 1], 0), ([0, 1], 1)])
    assert a.split_equal(4, True, 0).n_tokens == 0
    assert a.n_used == 0
    ub = a.split_equal(4, False, 0)
    assert ub.n_tokens == 2
    assert ub.n_seqs == 1
    assert ub.n_seqs_unq == 2
    assert ub.seq_idx[0] == 0 and ub.seq_idx[1] == 1


def test_s4_4_ex_tail_rule_defer():
    a = make(seqs({0: 2, 1: 3}, [0, 1]))
    assert drain(lambda: a.split_equal(4, True, 2)) == [[0, 1], [2, 3, 4]]


def test_s4_4_ex_tail_rule_complete_first_set():
    a = make(seqs(3, [0, 1]))
    assert drain(lambda: a.split_equal(4, False, 2)) == [[0, 1, 2], [3, 4, 5]]


def test_s4_4_ex_tail_rule_truncate_and_s10_17():
    a = make(seqs(5, [0]))
    ub = a.split_equal(4, False, 2)
    assert ub.pos == [0, 1, 2]
    ub = a.split_equal(4, False, 2)
    assert ub.pos == [3, 4]
    assert a.split_equal(4, False, 2).n_tokens == 0
    assert a.n_used == 5


def test_s4_4_ex_tail_rule_three_sequences_and_s10_16():
    a = make(seqs(5, [0, 1, 2]))
    ub = a.split_equal(8, True, 3)
    assert ub.n_tokens == 6
    assert ub.batch_idx == [0, 1, 5, 6, 10, 11]
    assert ub.pos == [0, 1, 0, 1, 0, 1]
    ub = a.split_equal(8, True, 3)
    assert ub.n_tokens == 3
    assert ub.seq_id_unq == [0]
    assert ub.pos == [2, 3, 4]
    ub = a.split_equal(8, True, 3)
    assert ub.n_tokens == 6
    assert ub.seq_id_unq == [1, 2]
    assert ub.pos == [2, 3, 4, 2, 3, 4]
    check_groups(ub, [{1}, {2}])
    assert a.split_equal(8, True, 3).n_tokens == 0
    assert a.n_used == 15


def test_s4_4_step6_and_s10_18_n_ubatch_not_above_keep_tail_raises():
    a = make(seqs(3, [0, 1]))
    with pytest.raises(ValueError):
        a.split_equal(2, True, 2)
    assert a.n_used == 0   # llmem: a failed call changes nothing
    with pytest.raises(ValueError):
        a.split_equal(1, False, 2)
    a.split_equal(3, True, 2)   # n_ubatch > keep_tail is fine


def test_s4_4_step6_not_tripped_by_early_returns():
    # step 1 (sequential + coupled) returns before the check
    a = make([([0, 1], 0), ([0, 1], 1)])
    assert a.split_equal(2, True, 2).n_tokens == 0
    # step 3 (nothing left) returns before the check
    a = make([(0, 0)])
    assert a.split_simple(8).n_tokens == 1
    assert a.split_equal(2, False, 2).n_tokens == 0


def test_s4_4_step1_sequential_coupled_consumes_nothing():
    a = make([(0, 0), ([1, 2], 0)])
    assert a.split_equal(8, True, 0).n_tokens == 0
    assert a.n_used == 0
    assert a.out_ids == []


def test_s4_4_consequence_sequential_ids_are_consecutive_from_first_unused():
    a = make([(1, 0), (2, 0), (0, 0), (3, 0)])
    ub = a.split_equal(8, True, 0)
    assert ub.seq_id_unq == [1, 2, 3]
    assert ub.batch_idx == [0, 1, 3]
    assert a.split_equal(8, True, 0).batch_idx == [2]


def test_s4_4_consequence_multi_id_set_blocks_overlapping_sets():
    a = make([(0, 0), ([1, 2], 0), (2, 1), (3, 0)])
    ub = a.split_equal(8, False, 0)
    # {2} overlaps {1,2}; {0}, {1,2}, {3} form the ubatch
    assert ub.batch_idx == [0, 1, 3]
    assert ub.n_seqs == 3
    assert ub.n_seqs_unq == 4
    assert a.split_equal(8, False, 0).batch_idx == [2]


# =============================================================================================
# §4.5 split_seq


def test_s4_5_example_and_s10_15():
    a = make([([0, 1], 0), (0, 1), (1, 1), (0, 2)])
    ub = a.split_seq(8)
    assert ub.batch_idx == [0, 1, 3]
    assert ub.n_seqs_unq == 2
    assert (ub.n_seqs, ub.n_seq_tokens, ub.equal_seqs) == (1, 3, True)
    assert a.split_seq(8).batch_idx == [2]
    assert a.split_seq(8).n_tokens == 0


def test_s4_5_respects_n_ubatch():
    a = make(seqs(5, [0]))
    assert drain(lambda: a.split_seq(2)) == [[0, 1], [2, 3], [4]]
