"""The toy hybrid model (Mamba-2 and attention layers) decodes through HybridMemory exactly as it
computes from scratch (see toy_session.py for the tolerance)."""

import numpy as np
import pytest

from llmem.toy import ToyHybrid
from toy_session import (TOL, Session, parallel_sequences, prefix_sharing, prompt_then_tokens,
                         random_tokens, state_round_trip)

MODEL = ToyHybrid(seed=5)

VARIANTS = {
    "unified": dict(n_ctx=64, n_seq_max=4),
    "streams": dict(n_ctx=32, n_seq_max=4, unified=False),
    "n_rs_seq=2": dict(n_ctx=64, n_seq_max=4, n_rs_seq=2),
}


@pytest.fixture(params=sorted(VARIANTS))
def make(request):
    return lambda: MODEL.new_memory(**VARIANTS[request.param])


def test_prompt_then_token_by_token(make):
    prompt_then_tokens(MODEL, make(), seed=40)


def test_parallel_sequences_of_unequal_lengths_in_one_batch(make):
    parallel_sequences(MODEL, make(), seed=41)


@pytest.mark.parametrize("name, n_ubatch", [("unified", 1), ("unified", 4), ("streams", 1),
                                            ("streams", 4), ("n_rs_seq=2", 4)])
def test_micro_batches_split_the_prompts(name, n_ubatch):
    # with n_rs_seq = 2 micro-batches must hold 3 tokens of a sequence: 4 is the smallest n_ubatch
    parallel_sequences(MODEL, MODEL.new_memory(**VARIANTS[name]), seed=42, n_ubatch=n_ubatch)


def test_seq_cp_prefix_then_divergence(make):
    prefix_sharing(MODEL, make(), seed=43)


def test_seq_rm_tail_with_rollback_then_redecode():
    # both parts move back: the recurrent state to its snapshot, the KV cache drops the cells
    rng = np.random.default_rng(44)
    v = MODEL.config.n_vocab
    s = Session(MODEL, MODEL.new_memory(64, 2, n_rs_seq=2))
    s.feed({0: random_tokens(rng, 6, v), 1: random_tokens(rng, 5, v)})
    s.feed({0: random_tokens(rng, 3, v), 1: random_tokens(rng, 2, v)})
    assert s.seq_rm_tail(0, s.pos[0][-1] - 1)
    assert s.seq_rm_tail(1, s.pos[1][-1])
    assert s.memory.mem_attn.seq_pos_max(0) == s.memory.mem_recr.seq_pos_max(0) == 6
    s.feed({0: random_tokens(rng, 2, v), 1: random_tokens(rng, 1, v)})
    s.check()


def test_tail_removal_without_rollback_changes_neither_part():
    rng = np.random.default_rng(45)
    v = MODEL.config.n_vocab
    s = Session(MODEL, MODEL.new_memory(64, 1))
    s.feed({0: random_tokens(rng, 6, v)})
    assert not s.seq_rm_tail(0, 3)
    assert s.memory.mem_attn.seq_pos_max(0) == 5
    s.feed({0: random_tokens(rng, 2, v)})
    s.check()


def test_shift_of_a_whole_sequence_rerotates_k():
    # the SSM layers ignore positions and the attention layers see unchanged distances once K is
    # re-rotated: decoding after the shift equals a model that saw the shifted positions
    rng = np.random.default_rng(46)
    v = MODEL.config.n_vocab
    s = Session(MODEL, MODEL.new_memory(64, 2))
    s.feed({0: random_tokens(rng, 8, v), 1: random_tokens(rng, 4, v)})
    s.shift(0, 12)
    s.feed({0: random_tokens(rng, 2, v), 1: random_tokens(rng, 2, v)})
    s.check()
    stale = MODEL.forward_full(s.tokens[0], list(range(8)) + s.pos[0][8:])
    assert not np.allclose(s.outputs[0][-1][1], stale[-1], **TOL)


def test_state_write_then_read_into_a_fresh_memory(make):
    state_round_trip(MODEL, make, seed=47)
