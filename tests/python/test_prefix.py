"""llmem.PrefixCache (issue 14, item 3): a serving workload on every toy model through the cache
gives forward_full's outputs, and a state machine over admit / decode / release / evict and a
sequence operation on the memory beside the cache keeps the index in agreement with the memory,
never corrupting a live request."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import llmem
from llmem.hybrid import HybridISWAMemory
from llmem.kv_cache import KVCacheISWA
from llmem.recurrent import RecurrentMemory
from llmem.status import SWAType
from llmem.toy import ToyHybrid, ToyRecurrent, ToyTransformer
from llmem.toy.base import ATTN, SSM, SWA, ToyConfig, ToyModel
from llmem.toy.transformer import model_rope
from hypothesis_profiles import model_settings
from prefix_workload import make_workload, serve, verify
from toy_session import TOL


class ToyHybridISWA(ToyModel):
    """Mamba-2, sliding-window and global attention layers on a HybridISWAMemory."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(ToyConfig(layer_kinds=(SSM, SWA, SSM, ATTN), n_swa=5), seed)

    def new_memory(self, n_ctx: int, n_seq_max: int = 1, n_requests: int = 1, swa_full: bool = False):
        cfg = self.config
        rec = [k == SSM for k in cfg.layer_kinds]
        attn = KVCacheISWA(cfg.n_layer, [0 if r else cfg.n_embd_k for r in rec], [0 if r else cfg.n_embd_k for r in rec],
                           kv_size=n_ctx, n_seq_max=n_seq_max, dtype_k=np.float32, dtype_v=np.float32,
                           n_swa=cfg.n_swa, swa_type=SWAType.STANDARD, swa_full=swa_full,
                           is_swa_layer=[k == SWA for k in cfg.layer_kinds], n_ubatch=8,
                           layer_filter=lambda il: not rec[il], rope=model_rope(cfg))
        recr = RecurrentMemory(cfg.n_layer, cfg.n_embd_r, cfg.n_embd_s, mem_size=n_requests, n_seq_max=n_seq_max,
                               layer_filter=rec)
        return HybridISWAMemory(attn=attn, recr=recr, is_recurrent_layer=rec)

    def _attn_ctx(self, ctx):
        return ctx.attn

    def _recr_ctx(self, ctx):
        return ctx.recr


MODELS = {
    "transformer": ToyTransformer(seed=1),
    "iswa": ToyTransformer.iswa(seed=2, n_swa=5),
    "recurrent": ToyRecurrent(seed=3),
    "hybrid": ToyHybrid(seed=4),
    "hybrid_iswa": ToyHybridISWA(seed=6),
}


def new_memory(kind: str, n_ctx: int = 512, n_requests: int = 3, n_holders: int = 40):
    model = MODELS[kind]
    n_seq_max = n_requests + n_holders
    if kind == "recurrent":
        return model.new_memory(n_seq_max=n_requests)
    if kind == "hybrid":
        m = model.new_memory(n_ctx, n_seq_max)
        return m
    if kind == "hybrid_iswa":
        return model.new_memory(n_ctx, n_seq_max, n_requests)
    if kind == "iswa":
        return model.new_memory(n_ctx, n_seq_max, n_ubatch=8)
    return model.new_memory(n_ctx, n_seq_max)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_serving_workload_through_the_cache_is_exact(kind):
    rng = np.random.default_rng(11)
    model = MODELS[kind]
    memory = new_memory(kind)
    cache = llmem.PrefixCache(memory, n_requests=3, checkpoint_interval=8)
    chats = make_workload(rng, model.config.n_vocab)
    counts = serve(model, memory, cache, chats, rng, check=cache.check)
    worst = verify(model, chats)
    stats = cache.stats()
    print(f"{kind}: decoded {counts['decoded']} tokens with the cache, {counts['without_cache']} without; "
          f"hit rate {stats['hit_rate']:.2f}, max |diff| {worst:.2g}, {stats['checkpoints']} checkpoints")
    assert counts["decoded"] + counts["hit"] == counts["without_cache"]
    assert stats["hit_tokens"] == counts["hit"] and stats["requests"] == counts["requests"]
    # shared system prompts and multi-turn chats must pay
    assert counts["hit"] > 0.3 * counts["without_cache"], counts
    cache.check()


@pytest.mark.parametrize("kind", ["transformer", "hybrid"])
def test_a_small_memory_evicts_and_stays_exact(kind):
    rng = np.random.default_rng(12)
    model = MODELS[kind]
    memory = new_memory(kind, n_ctx=160, n_holders=12)
    cache = llmem.PrefixCache(memory, n_requests=3)
    chats = make_workload(rng, model.config.n_vocab, n_chats=8)
    serve(model, memory, cache, chats, rng, parallel=2, check=cache.check)
    verify(model, chats)
    assert cache.stats()["evictions"] > 0


def test_reuse_of_a_prefix_another_request_is_still_extending():
    model = MODELS["hybrid"]
    memory = new_memory("hybrid")
    cache = llmem.PrefixCache(memory, n_requests=3)
    rng = np.random.default_rng(13)
    v = model.config.n_vocab
    prompt = list(map(int, rng.integers(0, v, 20)))
    a, hit = cache.admit(prompt)
    assert hit == 0
    model.decode(llmem.Batch(token=np.array(prompt, np.int32), seq_id=np.full(20, a, np.int32)), memory)
    cache.commit(a, prompt)
    b, hit = cache.admit(prompt + [1, 2, 3])       # a is live, still to generate
    assert hit == 20 and memory.seq_pos_max(b) == 19
    out = model.decode(llmem.Batch(token=np.array([1, 2, 3], np.int32), seq_id=np.full(3, b, np.int32)), memory)
    np.testing.assert_allclose(out[-1], model.forward_full(prompt + [1, 2, 3])[-1], **TOL)
    cache.commit(b, [1, 2, 3])
    cache.check()


def test_a_hit_never_takes_the_last_token_and_keys_separate():
    model = MODELS["transformer"]
    memory = new_memory("transformer")
    cache = llmem.PrefixCache(memory, n_requests=3)
    p = list(range(1, 11))
    s, _ = cache.admit(p)
    model.decode(llmem.Batch(token=np.array(p, np.int32), seq_id=np.full(10, s, np.int32)), memory)
    cache.commit(s, p)
    cache.release(s)
    assert cache.match(p) == 9 and cache.match(p + [5]) == 10
    assert cache.match(p, key="adapter-b") == 0
    seq, hit = cache.admit(p, seq_id=2)
    assert (seq, hit) == (2, 9) and memory.seq_pos_max(2) == 8
    with pytest.raises(ValueError, match="serving a request"):
        cache.admit(p, seq_id=2)
    with pytest.raises(ValueError, match="ends at position"):
        cache.commit(2, [3, 4])
    cache.check()


def test_bad_construction():
    with pytest.raises(TypeError, match="memory must be"):
        llmem.PrefixCache(object())
    with pytest.raises(ValueError, match="unified"):
        llmem.PrefixCache(MODELS["transformer"].new_memory(64, 4, unified=False))
    with pytest.raises(ValueError, match="n_requests"):
        llmem.PrefixCache(new_memory("transformer"), n_requests=0)


def test_prefill_chunks_end_on_interval_multiples_and_the_branch_point():
    memory = new_memory("recurrent")
    cache = llmem.PrefixCache(memory, checkpoint_interval=8)
    s, _ = cache.admit(list(range(30)))
    chunks = cache.prefill_chunks(s, list(range(30)), 5)
    ends = np.cumsum([len(c) for c in chunks])
    assert list(ends) == [5, 8, 13, 16, 21, 24, 29, 30]


# -- the state machine -----------------------------------------------------------------------------

class PrefixMachine(RuleBasedStateMachine):
    """Requests over a few shared bases; every decode's logits are checked against forward_full
    (a corrupted live request shows there), and the index against the memory after every rule."""

    kind = "transformer"

    @initialize(data=st.data())
    def setup(self, data):
        self.model = MODELS[self.kind]
        small = data.draw(st.booleans(), label="small memory")
        self.memory = new_memory(self.kind, n_ctx=80 if small else 256, n_requests=3, n_holders=10)
        self.cache = llmem.PrefixCache(self.memory, n_requests=3,
                                       checkpoint_interval=data.draw(st.sampled_from([0, 4]), label="interval"),
                                       max_checkpoints=data.draw(st.sampled_from([4, 64]), label="max ckpts"))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
        v = self.model.config.n_vocab
        self.bases = [list(map(int, rng.integers(0, v, n))) for n in (6, 12)]
        self.history = {}

    def _decode(self, seq, tokens):
        batch = llmem.Batch(token=np.asarray(tokens, np.int32), seq_id=np.full(len(tokens), seq, np.int32),
                            output=np.ones(len(tokens), bool))
        ctx = self.cache.init_batch(batch, 8)
        if ctx.status != llmem.Status.SUCCESS:
            return False
        logits = self.model.decode(batch, self.memory, 8)
        self.cache.commit(seq, tokens)
        hist = self.history[seq]
        hist += list(tokens)
        ref = self.model.forward_full(hist)[len(hist) - len(tokens):]
        np.testing.assert_allclose(logits, ref, **TOL)
        return True

    @rule(data=st.data())
    def admit(self, data):
        if len(self.history) == 3:
            return
        base = data.draw(st.sampled_from(self.bases + [[]]), label="base")
        cut = data.draw(st.integers(0, len(base)), label="cut")
        extra = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=6), label="extra")
        prompt = base[:cut] + extra
        seq, hit = self.cache.admit(prompt)
        assert 0 <= hit < len(prompt)
        assert self.memory.seq_pos_max(seq) == hit - 1
        self.history[seq] = list(prompt[:hit])
        if not self._decode(seq, prompt[hit:]):
            self.cache.release(seq)
            del self.history[seq]

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def decode(self, data):
        seq = data.draw(st.sampled_from(sorted(self.history)), label="seq")
        tokens = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=3), label="tokens")
        self._decode(seq, tokens)

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def release(self, data):
        seq = data.draw(st.sampled_from(sorted(self.history)), label="seq")
        self.cache.release(seq)
        del self.history[seq]

    @precondition(lambda self: 0 < len(self.history) < 3)
    @rule(data=st.data())
    def seq_cp_beside_the_cache(self, data):
        # a sequence operation on the memory itself, between a live request and a free id: a
        # range that would pair cells with another position's recurrent state is refused
        src = data.draw(st.sampled_from(sorted(self.history)), label="src")
        dst = min(set(range(3)) - set(self.history))
        last = self.memory.seq_pos_max(src)
        p1 = data.draw(st.integers(0, last + 2), label="p1")
        if self.kind != "transformer" and self.kind != "iswa" and p1 <= last:
            with pytest.raises(ValueError, match="wrong state"):
                self.memory.seq_cp(src, dst, 0, p1)
        else:
            first = self.memory.seq_pos_min(src)
            self.memory.seq_cp(src, dst, 0, p1)
            # an iSWA memory answers for its window part (as llama.cpp does), which holds only the
            # window of a request admitted from the cache: a range ending before it copies no
            # window cell there
            expected = min(last, p1 - 1) if p1 - 1 >= first else -1
            assert self.memory.seq_pos_max(dst) == expected
            assert self.memory.seq_rm(dst, -1, -1)
        assert self.memory.seq_pos_max(dst) == -1

    @rule(n=st.integers(1, 40))
    def evict(self, n):
        before = self.cache.stats()["cached_tokens"]
        freed = self.cache.evict(n)
        assert self.cache.stats()["cached_tokens"] == before - freed

    @invariant()
    def index_agrees_with_memory(self):
        if hasattr(self, "cache"):
            self.cache.check()
            for seq, hist in self.history.items():
                np.testing.assert_array_equal(self.cache.tokens(seq), hist)

    def teardown(self):
        if hasattr(self, "cache"):
            for seq in list(self.history):
                self.cache.release(seq)
            self.cache.clear()
            self.cache.check()
            # nothing leaks: with no request and an empty cache the memory is empty
            assert self.cache.stats()["cached_tokens"] == 0 and self.cache.stats()["checkpoints"] == 0
            if not isinstance(self.memory, RecurrentMemory):
                assert self.memory.used == 0
            for seq in range(self.memory.n_seq_max):
                assert self.memory.seq_pos_max(seq) == -1


def _machine(kind):
    cls = type(f"TestPrefix_{kind}", (PrefixMachine,), {"kind": kind})
    cls.TestCase.settings = model_settings(25, stateful_step_count=12)
    return cls.TestCase


TestPrefixTransformer = _machine("transformer")
TestPrefixISWA = _machine("iswa")
TestPrefixRecurrent = _machine("recurrent")
TestPrefixHybrid = _machine("hybrid")
TestPrefixHybridISWA = _machine("hybrid_iswa")


def test_iswa_hit_only_where_the_window_cells_are_held():
    # a 400-token prompt decoded before any commit through a 256-cell window cache: the window cache
    # reuses the prompt's early cells as it goes, so a later prompt sharing only the first 100
    # tokens finds them cached in the base cache but not the window position 100 needs
    model = MODELS["iswa"]
    memory = model.new_memory(512, 8, n_ubatch=64)
    assert memory.swa.size == 256
    cache = llmem.PrefixCache(memory, n_requests=2)
    rng = np.random.default_rng(14)
    v = model.config.n_vocab
    long = list(map(int, rng.integers(0, v, 400)))
    seq, _ = cache.admit(long)
    for i in range(0, 400, 50):                # no commit meanwhile: nothing is shared yet
        chunk = np.array(long[i:i + 50], np.int32)
        model.decode(llmem.Batch(token=chunk, seq_id=np.full(len(chunk), seq, np.int32)), memory, 64)
    cache.commit(seq, long)
    cache.release(seq)
    assert memory.swa.seq_pos_min(cache._roots[None].children[long[0]].holder) > 100
    branch = long[:100] + [1, 2, 3]
    assert cache.match(branch) == 0            # the window of position 100 is gone
    assert cache.match(long[:399] + [7]) == 0    # the holder keeps the window of its end only
    assert cache.match(long + [7]) == 400         # the next turn of the conversation
    seq, hit = cache.admit(long + [7])
    assert memory.swa.seq_pos_min(seq) >= 400 - model.config.n_swa  # the window, not more, is shared
    for _ in range(3):                            # the window slides on through the shared cells
        out = model.decode(llmem.Batch(token=np.array([7], np.int32), seq_id=np.array([seq], np.int32)), memory, 64)
        cache.commit(seq, [7])
    np.testing.assert_allclose(out[0], model.forward_full(long + [7, 7, 7])[-1], **TOL)
    cache.check()


def test_init_batch_evicts_just_enough():
    model = MODELS["transformer"]
    memory = model.new_memory(64, 12)
    cache = llmem.PrefixCache(memory, n_requests=2)
    rng = np.random.default_rng(15)
    v = model.config.n_vocab
    for i in range(6):                           # six released 10-token prompts: 60 cells cached
        p = [i] + list(map(int, rng.integers(0, v, 9)))
        seq, _ = cache.admit(p)
        model.decode(llmem.Batch(token=np.array(p, np.int32), seq_id=np.full(10, seq, np.int32)), memory)
        cache.commit(seq, p)
        cache.release(seq)
    assert cache.stats()["cached_tokens"] == 60 and memory.used == 60
    seq, _ = cache.admit(list(range(50, 63)))
    batch = llmem.Batch(token=np.arange(50, 63, dtype=np.int32), seq_id=np.full(13, seq, np.int32))
    assert memory.init_batch(batch, 16).status == llmem.Status.FAILED_PREPARE
    ctx = cache.init_batch(batch, 16)
    assert ctx.status == llmem.Status.SUCCESS
    # 9 cells were missing: the least recently used prompt and the next one went, not more
    assert cache.stats()["evictions"] == 1 and cache.stats()["cached_tokens"] == 50 or \
        cache.stats()["evictions"] == 2 and cache.stats()["cached_tokens"] == 40
    big = llmem.Batch(token=np.arange(70, dtype=np.int32), seq_id=np.full(70, seq, np.int32))
    assert cache.init_batch(big, 16).status == llmem.Status.FAILED_PREPARE   # more than the memory
    cache.check()
