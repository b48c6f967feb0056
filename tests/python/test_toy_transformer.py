"""The toy transformer decodes through KVCache and KVCacheISWA exactly as it computes from
scratch (see toy_session.py for the tolerance)."""

import numpy as np
import pytest

from llmem.toy import ATTN, SWA, ToyConfig, ToyTransformer
from toy_session import (TOL, Session, parallel_sequences, prefix_sharing, prompt_then_tokens,
                         random_tokens, state_round_trip)

PLAIN = ToyTransformer(seed=1)
ISWA = ToyTransformer.iswa(seed=2, n_swa=5)

# (model, memory options): one unified cache, one stream per sequence, V not transposed, iSWA
VARIANTS = {
    "kv": (PLAIN, dict(n_ctx=64, n_seq_max=4)),
    "kv-streams": (PLAIN, dict(n_ctx=32, n_seq_max=4, unified=False)),
    "kv-no-vtrans": (PLAIN, dict(n_ctx=64, n_seq_max=4, v_trans=False)),
    "iswa": (ISWA, dict(n_ctx=64, n_seq_max=4, n_ubatch=8)),
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    model, options = VARIANTS[request.param]
    return model, lambda: model.new_memory(**options)


def test_prompt_then_token_by_token(variant):
    model, make = variant
    prompt_then_tokens(model, make(), seed=10)


def test_parallel_sequences_in_one_batch(variant):
    model, make = variant
    parallel_sequences(model, make(), seed=11)


@pytest.mark.parametrize("n_ubatch", [1, 3, 8])
def test_micro_batches_split_the_prompts(variant, n_ubatch):
    model, make = variant
    parallel_sequences(model, make(), seed=12, n_ubatch=n_ubatch)


def test_seq_cp_prefix_then_divergence(variant):
    model, make = variant
    prefix_sharing(model, make(), seed=13)


def test_seq_cp_of_part_of_a_prefix():
    # only the first 5 of 9 positions are shared; 1 and 2 continue from position 5
    s = prefix_sharing(PLAIN, PLAIN.new_memory(64, 4), seed=14, p1=5)
    assert s.pos[1][:6] == [0, 1, 2, 3, 4, 5]


def test_seq_rm_tail_then_redecode(variant):
    model, make = variant
    rng = np.random.default_rng(15)
    v = model.config.n_vocab
    s = Session(model, make())
    s.feed({0: random_tokens(rng, 10, v), 1: random_tokens(rng, 6, v)})
    assert s.seq_rm_tail(0, 6)
    s.feed({0: random_tokens(rng, 4, v), 1: random_tokens(rng, 1, v)})
    assert s.seq_rm_tail(1, 3)
    s.feed({1: random_tokens(rng, 2, v)})
    s.check()


def test_window_cache_smaller_than_the_history():
    # 280 tokens through a 256-cell window cache: cells that left the window are reused
    memory = ISWA.new_memory(n_ctx=512, n_seq_max=1, n_ubatch=48)
    assert memory.swa.size == 256 < 280
    s = prompt_then_tokens(ISWA, memory, seed=16, n_prompt=240, n_steps=40, n_ubatch=48)
    # the window cache has dropped the oldest positions, the base cache holds all of them
    assert memory.base.used == 280 and memory.swa.seq_pos_min(0) >= 280 - 256


@pytest.mark.parametrize("name", ["kv", "kv-streams", "iswa-full"])
def test_shift_of_a_whole_sequence_rerotates_k(name):
    # Shifting every position of a sequence keeps the distances between its tokens, so every
    # layer's K/V rows stay valid once K is re-rotated: what is decoded next must equal a model
    # that saw the shifted positions from the start.
    model = ISWA if name.startswith("iswa") else PLAIN
    options = dict(swa_full=True) if name.startswith("iswa") else dict(unified=name == "kv")
    rng = np.random.default_rng(17)
    v = model.config.n_vocab
    s = Session(model, model.new_memory(64, 2, **options))
    assert s.memory.get_can_shift()
    s.feed({0: random_tokens(rng, 9, v), 1: random_tokens(rng, 5, v)})
    s.shift(0, 20)
    s.shift(1, 2)
    s.feed({0: random_tokens(rng, 3, v), 1: random_tokens(rng, 2, v)})
    s.feed({0: random_tokens(rng, 1, v)})
    assert s.pos[0] == list(range(20, 20 + 13))
    s.check()
    # control: with K left at the old positions (no re-rotation) the logits would differ
    stale = model.forward_full(s.tokens[0], list(range(9)) + s.pos[0][9:])
    assert not np.allclose(s.outputs[0][-1][1], stale[-1], **TOL)


@pytest.mark.parametrize("kind", [ATTN, SWA])
def test_context_shift_of_a_one_layer_model(kind):
    # llama.cpp's context shift (drop [n_keep, n_keep + n_discard), move the rest down). With one
    # layer the kept K/V rows depend only on their token and position, so after the K-shift the
    # cache holds exactly what a model that never saw the dropped tokens would: the comparison is
    # exact. With more layers the kept rows still carry the dropped tokens through the lower
    # layers, and no cache-free computation reproduces them (toy_session compares new outputs
    # only, and the whole-sequence shift above covers deeper models).
    model = ToyTransformer(seed=3, config=ToyConfig(layer_kinds=(kind,), n_swa=6))
    options = dict(swa_full=True) if kind == SWA else {}
    rng = np.random.default_rng(18)
    v = model.config.n_vocab
    s = Session(model, model.new_memory(32, 2, **options))
    s.feed({0: random_tokens(rng, 20, v), 1: random_tokens(rng, 7, v)})
    s.context_shift(0, n_keep=4, n_discard=10)
    assert s.memory.seq_pos_max(0) == 9
    for _ in range(3):
        s.feed({0: random_tokens(rng, 2, v), 1: random_tokens(rng, 1, v)})
    assert s.pos[0] == list(range(16))
    s.check()


def test_state_write_then_read_into_a_fresh_memory(variant):
    model, make = variant
    state_round_trip(model, make, seed=19)


def test_decode_returns_outputs_in_batch_order():
    # outputs marked out of order across sequences come back in batch order, as llama_decode's
    # logits do, whatever order the micro-batches computed them in
    import llmem
    memory = PLAIN.new_memory(64, 3, unified=False)
    tokens = np.array([5, 6, 7, 8, 9, 10], np.int32)
    seqs = np.array([2, 0, 1, 2, 0, 1], np.int32)
    out = np.array([True, False, True, True, True, False])
    logits = PLAIN.decode(llmem.Batch(token=tokens, seq_id=seqs, output=out), memory, n_ubatch=2)
    ref = {seq: PLAIN.forward_full(tokens[seqs == seq]) for seq in range(3)}
    expected = [ref[2][0], ref[1][0], ref[2][1], ref[0][1]]
    np.testing.assert_allclose(logits, np.array(expected), **TOL)
