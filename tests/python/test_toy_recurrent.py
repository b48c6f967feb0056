"""The toy Mamba-2 model decodes through RecurrentMemory exactly as it computes from scratch
(see toy_session.py for the tolerance)."""

import numpy as np
import pytest

from llmem.toy import ToyRecurrent
from toy_session import (TOL, Session, parallel_sequences, prefix_sharing, prompt_then_tokens,
                         random_tokens, state_round_trip)

MODEL = ToyRecurrent(seed=4)


@pytest.fixture(params=[0, 3], ids=["no-rollback", "n_rs_seq=3"])
def make(request):
    return lambda: MODEL.new_memory(n_seq_max=4, n_rs_seq=request.param)


def test_prompt_then_token_by_token(make):
    prompt_then_tokens(MODEL, make(), seed=20)


def test_parallel_sequences_of_unequal_lengths_in_one_batch(make):
    parallel_sequences(MODEL, make(), seed=21)


@pytest.mark.parametrize("n_rs_seq, n_ubatch", [(0, 1), (0, 2), (0, 5), (3, 5), (3, 6)])
def test_micro_batches_split_the_prompts(n_rs_seq, n_ubatch):
    # with n_rs_seq the split keeps each sequence's last n_rs_seq + 1 tokens in one micro-batch,
    # so n_ubatch must exceed that (llmem raises below it, where llama.cpp aborts)
    parallel_sequences(MODEL, MODEL.new_memory(n_seq_max=4, n_rs_seq=n_rs_seq), seed=22,
                       n_ubatch=n_ubatch)


def test_seq_cp_shares_the_state_then_sequences_diverge(make):
    prefix_sharing(MODEL, make(), seed=23)


def test_seq_rm_of_a_whole_sequence_then_a_new_one():
    rng = np.random.default_rng(24)
    v = MODEL.config.n_vocab
    s = Session(MODEL, MODEL.new_memory(n_seq_max=2))
    s.feed({0: random_tokens(rng, 6, v), 1: random_tokens(rng, 5, v)})
    s.seq_rm_all(0)
    s.feed({0: random_tokens(rng, 7, v), 1: random_tokens(rng, 1, v)})
    s.check()


def test_tail_removal_without_rollback_is_refused_and_changes_nothing():
    rng = np.random.default_rng(25)
    v = MODEL.config.n_vocab
    s = Session(MODEL, MODEL.new_memory(n_seq_max=1))
    s.feed({0: random_tokens(rng, 6, v)})
    assert not s.seq_rm_tail(0, 4)
    s.feed({0: random_tokens(rng, 2, v)})
    s.check()


@pytest.mark.parametrize("n_back", [1, 2, 3])
def test_rollback_of_a_draft_then_redecode(n_back):
    # speculative decoding: a draft of 3 tokens is decoded in one batch, the last n_back are
    # rejected with seq_rm, and decoding resumes from the snapshot the memory kept
    rng = np.random.default_rng(26 + n_back)
    v = MODEL.config.n_vocab
    s = Session(MODEL, MODEL.new_memory(n_seq_max=2, n_rs_seq=3))
    s.feed({0: random_tokens(rng, 7, v), 1: random_tokens(rng, 4, v)})
    s.feed({0: random_tokens(rng, 3, v), 1: random_tokens(rng, 3, v)})
    end0, end1 = s.pos[0][-1], s.pos[1][-1]
    assert s.seq_rm_tail(0, end0 - n_back + 1)
    assert s.seq_rm_tail(1, end1 - n_back + 1)
    assert s.memory.seq_pos_max(0) == end0 - n_back
    s.feed({0: random_tokens(rng, 2, v), 1: random_tokens(rng, 1, v)})
    s.feed({0: random_tokens(rng, 1, v), 1: random_tokens(rng, 1, v)})
    s.check()


def test_state_write_then_read_into_a_fresh_memory(make):
    state_round_trip(MODEL, make, seed=30)


def test_seq_add_moves_positions_only():
    # a recurrent state has no positions inside it: shifting only moves where decoding resumes
    rng = np.random.default_rng(31)
    v = MODEL.config.n_vocab
    s = Session(MODEL, MODEL.new_memory(n_seq_max=1))
    s.feed({0: random_tokens(rng, 5, v)})
    s.shift(0, 10)
    s.feed({0: random_tokens(rng, 3, v)})
    assert s.memory.seq_pos_max(0) == 17
    s.check()


@pytest.mark.parametrize("seed", [2, 4, 11])
def test_rollback_after_a_later_micro_batch_moved_the_cell(seed):
    # deviation R15: in a batch of four sequences, a later micro-batch compacts its slot and moves
    # the cells of sequences decoded earlier in the batch; their rollback snapshots move with them
    # (llama.cpp moves only the current state, and the rollback then reads another cell's rows).
    # Without the fix these seeds roll back into stale rows and the outputs differ.
    rng = np.random.default_rng(seed)
    v = MODEL.config.n_vocab
    s = Session(MODEL, MODEL.new_memory(n_ctx=64, n_seq_max=4, n_rs_seq=2))
    for q in rng.permutation(4):
        s.feed({int(q): random_tokens(rng, int(rng.integers(1, 4)), v)})
    counts = {q: int(rng.integers(1, 4)) for q in range(4)}
    s.feed({q: random_tokens(rng, c, v) for q, c in counts.items()}, n_ubatch=int(rng.integers(4, 8)))
    for q in range(4):
        assert s.seq_rm_tail(q, s.pos[q][-1] - min(counts[q], 2) + 1)
    s.feed({q: random_tokens(rng, 1, v) for q in range(4)})
    s.check()
