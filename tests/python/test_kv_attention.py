"""Attention metadata of a placed micro-batch (csrc/core/kv_attention.cpp): the dense mask (f32,
f16, padded rows, caller buffers), the per-token lists, the write indices, the paged form, and
the one-call decode step.

Masks are checked against a slow reference computed here from the cell table (spec 7.4) on
random states of every cache kind (unified and per-sequence streams, every SWA type, causal and
not), with prefill chunks of several tokens per sequence (which the row reuse of the builder
covers) as well as decode steps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmem
from llmem import Batch, KVCache, KVCacheISWA, LlmemError, PagedKV, SWAType
from llmem.toy import ToyTransformer
from llmem.toy import layers as L
from llmem.toy.base import SWA

from reference.ref_kv import is_masked_swa

SWA_KINDS = [(SWAType.NONE, 0), (SWAType.STANDARD, 5), (SWAType.CHUNKED, 4), (SWAType.SYMMETRIC, 6),
             (SWAType.STANDARD, 1)]


def reference_mask(cache: KVCache, ctx, causal: bool) -> np.ndarray:
    """spec 7.4 entry by entry: [n_tokens, n_kv] of 0 / -inf."""
    cells = cache.cells()
    ub = ctx.ubatch
    n_kv = ctx.n_kv
    rows = ctx.k_idxs() // cache.size  # stream of each token
    out = np.full((ub.n_tokens, n_kv), -np.inf, np.float32)
    n_swa, swa_type = SWA_OF[id(cache)]
    for t in range(ub.n_tokens):
        s = int(ub.seq_id[t]) if np.ndim(ub.seq_id[t]) == 0 else int(ub.seq_id[t][0])
        p1 = int(ub.pos[t])
        stream = int(rows[t])
        for j in range(n_kv):
            p0 = int(cells["pos"][stream][j])
            if p0 < 0 or s not in cells["seqs"][stream][j]:
                continue
            if causal and p0 > p1:
                continue
            if is_masked_swa(n_swa, swa_type, p0, p1):
                continue
            out[t, j] = 0.0
    return out


SWA_OF: dict = {}  # the window of each cache made here (id -> (n_swa, swa_type))


def make_cache(swa, unified, n_seq_max=4, size=64, n_pad=1):
    swa_type, n_swa = swa
    c = KVCache(1, 4, 4, size, n_seq_max=n_seq_max, unified=unified, n_swa=n_swa, swa_type=swa_type,
                dtype_k=np.float32, dtype_v=np.float32, n_pad=n_pad)
    SWA_OF[id(c)] = (n_swa, int(swa_type))
    return c


def random_history(cache: KVCache, rng: np.random.Generator, n_steps: int):
    """Random prefills, decode steps and sequence operations; yields each applied context."""
    n_seq = cache.n_seq_max
    for _ in range(n_steps):
        op = rng.integers(0, 10)
        if op == 0:
            s = int(rng.integers(0, n_seq))
            mx = cache.seq_pos_max(s)
            if mx > 0:
                cache.seq_rm(s, int(rng.integers(0, mx)), -1)
            continue
        if op == 1 and cache.n_stream == 1:
            a, b = rng.choice(n_seq, 2, replace=False) if n_seq > 1 else (0, 0)
            if a != b:
                cache.seq_rm(int(b), -1, -1)
                cache.seq_cp(int(a), int(b), -1, -1)
            continue
        # a batch: some sequences, 1..5 tokens each, in a random interleaving (unified) or grouped
        seqs = sorted(rng.choice(n_seq, int(rng.integers(1, n_seq + 1)), replace=False).tolist())
        counts = {s: int(rng.integers(1, 6)) for s in seqs}
        if cache.n_stream > 1:
            # an equal split wants equal counts per sequence set
            k = int(rng.integers(1, 6))
            counts = {s: k for s in seqs}
            ids = [s for s in seqs for _ in range(k)]
        else:
            ids = [s for s in seqs for _ in range(counts[s])]
            rng.shuffle(ids)
        batch = Batch(token=np.arange(len(ids), dtype=np.int32), seq_id=np.array(ids, np.int32),
                      output=np.ones(len(ids), bool))
        ctx = cache.init_batch(batch, int(rng.integers(1, len(ids) + 1)))
        if ctx.status != llmem.Status.SUCCESS:
            cache.clear()
            continue
        for _ub in ctx:
            yield ctx


def check_all_forms(cache: KVCache, ctx, causal: bool):
    want = reference_mask(cache, ctx, causal)
    got = ctx.kq_mask(causal)
    np.testing.assert_array_equal(got, want)
    # f16, into a caller buffer, padded
    h = np.empty(want.shape, np.float16)
    assert ctx.kq_mask(causal, out=h, dtype=np.float16) is h
    np.testing.assert_array_equal(h.astype(np.float32), want)
    n_groups = cache.n_stream if cache.n_stream == 1 else len(ctx.ubatch.seq_id_unq)
    n_tps = want.shape[0] // n_groups
    rows = (n_tps + 7) // 8 * 8
    padded = ctx.kq_mask(causal, pad=8)
    assert padded.shape == (n_groups * rows, want.shape[1])
    blocks = padded.reshape(n_groups, rows, -1)
    np.testing.assert_array_equal(blocks[:, :n_tps].reshape(want.shape), want)
    assert np.isneginf(blocks[:, n_tps:]).all()
    # lists
    offs, cells = ctx.kq_cells(causal)
    for t in range(want.shape[0]):
        assert cells[offs[t]:offs[t + 1]].tolist() == np.flatnonzero(want[t] == 0).tolist()
    # paged form
    pk = ctx.paged_kv(causal)
    check_paged(cache, ctx, pk, want)


def check_paged(cache, ctx, pk: PagedKV, want: np.ndarray):
    ub = ctx.ubatch
    rows = ctx.k_idxs()
    cells = cache.cells()
    n = ub.n_tokens
    assert pk.qo_seq.shape == (n,) and pk.kv_start.shape == (n,)
    assert pk.qo_indptr[-1] == n and sorted(pk.qo_order.tolist()) == list(range(n))
    for r in range(len(pk.seq_ids)):
        assert (pk.qo_seq[pk.qo_order[pk.qo_indptr[r]:pk.qo_indptr[r + 1]]] == r).all()
        pages = pk.kv_indices[pk.kv_indptr[r]:pk.kv_indptr[r + 1]]
        assert pk.kv_last_page_len[r] == (1 if len(pages) else 0)
        pos = [cells["pos"][g // cache.size][g % cache.size] for g in pages]
        assert pos == sorted(pos)  # position order
    for t in range(n):
        r = pk.qo_seq[t]
        s = int(ub.seq_id[t]) if np.ndim(ub.seq_id[t]) == 0 else int(ub.seq_id[t][0])
        assert pk.seq_ids[r] == s
        assert pk.kv_indptr[r] <= pk.kv_start[t] <= pk.kv_end[t] <= pk.kv_indptr[r + 1]
        seen = pk.kv_indices[pk.kv_start[t]:pk.kv_end[t]]
        stream = rows[t] // cache.size
        assert (seen // cache.size == stream).all()
        assert sorted((seen % cache.size).tolist()) == np.flatnonzero(want[t] == 0).tolist()


@pytest.mark.parametrize("swa", SWA_KINDS)
@pytest.mark.parametrize("unified", [True, False])
def test_masks_match_reference_on_random_histories(swa, unified):
    rng = np.random.default_rng(hash((int(swa[0]), swa[1], unified)) % 2**32)
    cache = make_cache(swa, unified, size=48 if unified else 24)
    checked = 0
    for ctx in random_history(cache, rng, 60):
        for causal in (True, False):
            check_all_forms(cache, ctx, causal)
        checked += 1
    assert checked > 10


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), swa=st.sampled_from(SWA_KINDS), unified=st.booleans(),
       n_seq_max=st.integers(1, 4))
def test_masks_match_reference_hypothesis(seed, swa, unified, n_seq_max):
    rng = np.random.default_rng(seed)
    cache = make_cache(swa, unified, n_seq_max=n_seq_max, size=32 if unified else 16)
    for ctx in random_history(cache, rng, 12):
        check_all_forms(cache, ctx, bool(rng.integers(0, 2)))


def test_full_context_mask_and_n_kv_padding():
    cache = make_cache((SWAType.NONE, 0), True, size=768, n_pad=256)
    ctx = cache.init_batch(Batch(token=np.arange(300, dtype=np.int32)), 512)
    ctx.apply()
    assert ctx.n_kv == 512
    np.testing.assert_array_equal(ctx.kq_mask(), reference_mask(cache, ctx, True))


# -- caller buffers and bad arguments --------------------------------------------------------------

def applied_ctx(unified=True):
    cache = make_cache((SWAType.NONE, 0), unified, n_seq_max=2, size=32)
    ctx = cache.init_batch(Batch(token=np.arange(6, dtype=np.int32),
                                 seq_id=np.array([0, 0, 0, 1, 1, 1], np.int32)), 8)
    ctx.apply()
    return cache, ctx


def test_out_buffers_are_written_in_place():
    cache, ctx = applied_ctx()
    m = np.full((6, ctx.n_kv), 7.0, np.float32)
    assert ctx.kq_mask(out=m) is m
    np.testing.assert_array_equal(m, ctx.kq_mask())
    raw = bytearray(6 * ctx.n_kv * 2)
    assert ctx.kq_mask(out=raw, dtype=np.float16) is raw
    np.testing.assert_array_equal(np.frombuffer(raw, np.float16).reshape(6, -1), ctx.kq_mask(dtype="float16"))
    k = np.zeros(6, np.int64)
    assert ctx.k_idxs(out=k) is k and k.tolist() == ctx.k_idxs().tolist()
    v = np.zeros(6 * 4, np.int64)
    assert ctx.v_idxs(out=v) is v
    size, e = cache.size, 4
    kk = ctx.k_idxs()
    want = ((kk // size * size * e)[:, None] + np.arange(e)[None, :] * size + (kk % size)[:, None]).reshape(-1)
    assert v.tolist() == want.tolist() == ctx.v_idxs().tolist()
    offs = np.zeros(7, np.int64)
    cells = np.zeros(100, np.int32)
    o, c = ctx.kq_cells(out=(offs, cells))
    assert o is offs and np.shares_memory(c, cells) and len(c) == offs[-1]
    o2, c2 = ctx.kq_cells()
    assert o2.tolist() == o.tolist() and c2.tolist() == c.tolist()
    buf = PagedKV.empty(max_tokens=16, max_seqs=4, max_pages=64)
    pk = ctx.paged_kv(out=buf)
    for got, want_arr, b in zip(pk, ctx.paged_kv(), buf):
        assert got.tolist() == want_arr.tolist() and np.shares_memory(got, b)


def test_bad_out_buffers_are_named_and_change_nothing():
    cache, ctx = applied_ctx()
    before = cache.cells()
    n_kv = ctx.n_kv
    with pytest.raises(ValueError, match="shape"):
        ctx.kq_mask(out=np.zeros((5, n_kv), np.float32))
    with pytest.raises(TypeError, match="float32"):
        ctx.kq_mask(out=np.zeros((6, n_kv), np.float64))
    with pytest.raises(TypeError, match="float16"):
        ctx.kq_mask(out=np.zeros((6, n_kv), np.float32), dtype=np.float16)
    ro = np.zeros((6, n_kv), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ctx.kq_mask(out=ro)
    with pytest.raises(ValueError, match="contiguous"):
        ctx.kq_mask(out=np.zeros((6, 2 * n_kv), np.float32)[:, ::2])
    with pytest.raises(TypeError, match="buffer"):
        ctx.kq_mask(out=[0.0] * (6 * n_kv))
    with pytest.raises(TypeError, match="dtype"):
        ctx.kq_mask(dtype=np.int32)
    with pytest.raises(ValueError, match="pad"):
        ctx.kq_mask(pad=0)
    with pytest.raises(ValueError, match="out"):
        ctx.k_idxs(out=np.zeros(5, np.int64))
    with pytest.raises(TypeError, match="int64"):
        ctx.k_idxs(out=np.zeros(6, np.int32))
    with pytest.raises(ValueError, match="cells"):
        ctx.kq_cells(out=(np.zeros(7, np.int64), np.zeros(2, np.int32)))
    with pytest.raises(TypeError, match="pair"):
        ctx.kq_cells(out=np.zeros(7, np.int64))
    with pytest.raises(ValueError, match="kv_indices"):
        ctx.paged_kv(out=PagedKV.empty(16, 4, 1))
    with pytest.raises(TypeError, match="9"):
        ctx.paged_kv(out=(np.zeros(4, np.int32),))
    after = cache.cells()
    assert np.array_equal(before["pos"], after["pos"]) and before["seqs"] == after["seqs"]


def test_metadata_before_apply_and_on_stale_context():
    cache = make_cache((SWAType.NONE, 0), True)
    ctx = cache.init_batch(Batch(token=np.arange(3, dtype=np.int32)), 8)
    with pytest.raises(LlmemError, match="apply"):
        ctx.kq_mask()
    with pytest.raises(LlmemError, match="apply"):
        ctx.paged_kv()
    ctx.apply()
    cache.seq_rm(0, 1, -1)
    with pytest.raises(llmem.StaleContextError):
        ctx.kq_mask(out=np.zeros((3, ctx.n_kv), np.float32))
    with pytest.raises(llmem.StaleContextError):
        ctx.paged_kv()


def test_paged_form_refuses_causal_2d_ubatches():
    cache = KVCache(1, 4, 4, 32, dtype_k=np.float32, dtype_v=np.float32, n_pos_per_embd=4)
    balloc = llmem.BatchAllocator(1, n_pos_per_embd=4)
    pos = np.array([[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], np.int32).reshape(-1)
    balloc.init(Batch(embd=np.ones((4, 3), np.float32), pos=pos), cache)
    ctx = cache.init_batch(balloc, 8)
    ctx.apply()
    m = ctx.kq_mask()
    assert m.shape == (4, ctx.n_kv)
    with pytest.raises(LlmemError, match="2-D"):
        ctx.paged_kv()
    ctx.paged_kv(causal=False)


# -- attention from the paged form equals attention with the dense mask (toy transformer) ----------

class PagedToy(ToyTransformer):
    """The toy transformer with its attention computed from ``paged_kv`` (gathering each token's
    K/V rows through its page slice) instead of the dense mask."""

    def _attention_cached(self, il, lw, h, pos, ctx):
        cfg = self.config
        q, k, v = self._qkv(lw, h, pos)
        sub = (ctx.swa if cfg.layer_kinds[il] == SWA else ctx.base) if hasattr(ctx, "swa") else ctx
        sub.cpy_k(il, k.reshape(len(h), -1))
        sub.cpy_v(il, v)
        pk = sub.paged_kv()
        cache = sub.cache
        K = cache.k(il).reshape(-1, cfg.n_embd_k).astype(np.float32)
        V = cache.v(il)
        size = cache.size
        out = np.empty((len(h), cfg.n_head * cfg.head_dim), np.float32)
        for t in range(len(h)):
            pages = pk.kv_indices[pk.kv_start[t]:pk.kv_end[t]]
            kt = K[pages].reshape(len(pages), cfg.n_head_kv, cfg.head_dim)
            if cache.v_trans:
                vt = V[pages // size, :cfg.n_embd_k, pages % size].astype(np.float32)
            else:
                vt = V.reshape(-1, V.shape[2])[pages, :cfg.n_embd_k].astype(np.float32)
            vt = vt.reshape(len(pages), cfg.n_head_kv, cfg.head_dim)
            zero = np.zeros((1, len(pages)), np.float32)
            out[t] = L.attention(q[t:t + 1], kt, vt, zero)[0]
        return out @ lw["wo"]


@pytest.mark.parametrize("iswa", [False, True])
@pytest.mark.parametrize("unified", [True, False])
def test_paged_attention_equals_dense_on_the_toy_transformer(iswa, unified):
    dense = ToyTransformer.iswa(seed=3, n_swa=5) if iswa else ToyTransformer(seed=3)
    paged = PagedToy(dense.seed, dense.config)
    mem_d = dense.new_memory(64, n_seq_max=3, unified=unified, n_ubatch=8)
    mem_p = paged.new_memory(64, n_seq_max=3, unified=unified, n_ubatch=8)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, dense.config.n_vocab, n).astype(np.int32) for n in (11, 7, 9)]
    for s, toks in enumerate(prompts):
        b = Batch(token=toks, seq_id=np.full(len(toks), s, np.int32), output=np.ones(len(toks), bool))
        # prefill in chunks of 4: tokens of one micro-batch see different cells (causal + window)
        np.testing.assert_allclose(paged.decode(b, mem_p, n_ubatch=4), dense.decode(b, mem_d, n_ubatch=4),
                                   rtol=1e-5, atol=1e-5)
    for step in range(6):
        toks = rng.integers(0, dense.config.n_vocab, 3).astype(np.int32)
        b = Batch(token=toks, seq_id=np.arange(3, dtype=np.int32), output=np.ones(3, bool))
        ld = dense.decode(b, mem_d)
        np.testing.assert_allclose(paged.decode(b, mem_p), ld, rtol=1e-5, atol=1e-5)
        if step == 2:
            for m in (mem_d, mem_p):
                m.seq_rm(1, 3, 6)  # a gap in sequence 1's positions


# -- the one-call decode step -----------------------------------------------------------------------

def general_step(mem, seq_ids, tokens):
    batch = Batch(token=np.asarray(tokens, np.int32), seq_id=np.asarray(seq_ids, np.int32),
                  output=np.ones(len(seq_ids), bool))
    ctx = mem.init_batch(batch, len(seq_ids))
    if ctx.status != llmem.Status.SUCCESS:
        return None
    ctx.apply()
    return ctx


def sub_contexts(ctx):
    return [ctx.base, ctx.swa] if hasattr(ctx, "swa") else [ctx]


def snapshot(mem):
    caches = [mem.base, mem.swa] if isinstance(mem, KVCacheISWA) else [mem]
    out = []
    for c in caches:
        cells = c.cells()
        out.append((cells["pos"].tolist(), cells["seqs"], cells["head"]))
    return out


def new_mem(kind, unified, size, n_seq_max):
    if kind == "iswa":
        return KVCacheISWA(1, 4, 4, size, n_seq_max=n_seq_max, unified=unified, n_swa=3,
                           swa_type=SWAType.STANDARD, is_swa_layer=[True], n_ubatch=4,
                           dtype_k=np.float32, dtype_v=np.float32)
    swa = {"plain": (SWAType.NONE, 0), "swa": (SWAType.CHUNKED, 4)}[kind]
    return KVCache(1, 4, 4, size, n_seq_max=n_seq_max, unified=unified, n_swa=swa[1], swa_type=swa[0],
                   dtype_k=np.float32, dtype_v=np.float32)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["plain", "swa", "iswa"]), unified=st.booleans(),
       n_seq_max=st.integers(1, 5), size=st.sampled_from([8, 16, 40]))
def test_decode_step_decides_as_init_batch_and_apply(data, kind, unified, n_seq_max, size):
    a = new_mem(kind, unified, size, n_seq_max)  # decode_step
    b = new_mem(kind, unified, size, n_seq_max)  # init_batch + apply
    for _ in range(data.draw(st.integers(1, 12))):
        if data.draw(st.integers(0, 4)) == 0:
            s = data.draw(st.integers(0, n_seq_max - 1))
            p0 = data.draw(st.integers(0, 8))
            a.seq_rm(s, p0, -1)
            b.seq_rm(s, p0, -1)
            continue
        ids = data.draw(st.lists(st.integers(0, n_seq_max - 1), min_size=1, max_size=n_seq_max, unique=True))
        toks = data.draw(st.lists(st.integers(0, 99), min_size=len(ids), max_size=len(ids)))
        want = general_step(b, ids, toks)
        if want is None:
            before = snapshot(a)
            with pytest.raises(LlmemError, match="no room"):
                a.decode_step(ids, toks)
            assert snapshot(a) == before
            continue
        got = a.decode_step(np.array(ids, np.int32) if data.draw(st.booleans()) else ids, toks)
        assert snapshot(a) == snapshot(b)
        for cg, cw in zip(sub_contexts(got), sub_contexts(want)):
            assert cg.n_kv == cw.n_kv
            assert cg.k_idxs().tolist() == cw.k_idxs().tolist()
            assert cg.v_idxs().tolist() == cw.v_idxs().tolist()
            assert cg.ubatch.pos.tolist() == cw.ubatch.pos.tolist()
            assert cg.ubatch.token.tolist() == cw.ubatch.token.tolist()
            assert cg.ubatch.seq_id_unq.tolist() == cw.ubatch.seq_id_unq.tolist()
            assert cg.ubatch.output.tolist() == cw.ubatch.output.tolist()
            np.testing.assert_array_equal(cg.kq_mask(), cw.kq_mask())
        while want.next():  # the general path's later micro-batches (per-stream, ids not consecutive)
            got.next()
            want.apply()
            got.apply()
            assert sub_contexts(got)[0].k_idxs().tolist() == sub_contexts(want)[0].k_idxs().tolist()
        assert snapshot(a) == snapshot(b)


def test_decode_step_positions_tokens_and_context():
    cache = KVCache(2, 8, 8, 64, n_seq_max=4, dtype_k=np.float32, dtype_v=np.float32)
    ctx = cache.decode_step([2, 0])
    assert ctx.ubatch.pos.tolist() == [0, 0] and ctx.ubatch.token is None
    assert ctx.status == llmem.Status.SUCCESS and ctx.n_kv > 0
    ctx.cpy_k(0, np.ones((2, 8), np.float32))
    ctx.cpy_v(0, np.ones((2, 8), np.float32))
    assert ctx.next() is False
    ctx = cache.decode_step(np.array([0, 2, 3], np.int32), tokens=[5, 6, 7])
    assert ctx.ubatch.pos.tolist() == [1, 1, 0]
    assert ctx.ubatch.token.tolist() == [5, 6, 7]
    assert cache.seq_pos_max(0) == 1 and cache.seq_pos_max(3) == 0
    m = ctx.kq_mask()
    assert (m == 0).sum(axis=1).tolist() == [2, 2, 1]
    pk = ctx.paged_kv()
    assert pk.qo_indptr.tolist() == [0, 1, 2, 3] and pk.seq_ids.tolist() == [0, 2, 3]


def test_decode_step_bad_arguments_change_nothing():
    cache = KVCache(1, 4, 4, 16, n_seq_max=3, dtype_k=np.float32, dtype_v=np.float32)
    cache.decode_step([0, 1])
    before = snapshot(cache)
    for bad, exc, what in [([], ValueError, "at least one"), ([0, 0], ValueError, "repeats"),
                           ([3], ValueError, "outside"), ([-1], ValueError, "outside"),
                           ([0, 1.5], TypeError, "int"), ([True], TypeError, "int"),
                           (5, TypeError, "sequence"), ([2**40], ValueError, "int32")]:
        with pytest.raises(exc, match=what):
            cache.decode_step(bad)
        assert snapshot(cache) == before
    with pytest.raises(ValueError, match="one token per sequence"):
        cache.decode_step([0, 1], tokens=[1])
    with pytest.raises(ValueError, match="negative"):
        cache.decode_step([0, 1], tokens=[1, -2])
    assert snapshot(cache) == before
    # no room: 16 cells, 2 used
    for _ in range(7):
        cache.decode_step([0, 1])
    full = snapshot(cache)
    with pytest.raises(LlmemError, match="no room"):
        cache.decode_step([0, 1, 2])
    assert snapshot(cache) == full


@pytest.mark.parametrize("kind", ["plain", "iswa"])
def test_decode_step_id_arrays_of_any_layout_decide_alike(kind):
    # the compiled step reads a 1-D C-contiguous int32 array in place and converts anything else:
    # every spelling of the same ids gives the same cells
    spellings = [lambda ids: list(ids), lambda ids: tuple(ids), lambda ids: np.array(ids, np.int32),
                 lambda ids: np.array(ids, np.int64), lambda ids: np.array(ids, ">i4"),
                 lambda ids: np.repeat(np.array(ids, np.int32), 2)[::2], lambda ids: np.array(ids, np.uint16)]
    results = []
    for spell in spellings:
        mem = new_mem(kind, True, 40, 5)
        rows = []
        for ids, toks in (([0, 3, 1], [4, 5, 6]), ([4, 1], [7, 8]), ([2, 0, 1, 3], [1, 1, 1, 1])):
            ctx = mem.decode_step(spell(ids), spell(toks))
            rows.append([c.k_idxs().tolist() for c in sub_contexts(ctx)])
            rows.append([c.ubatch.token.tolist() for c in sub_contexts(ctx)])
        results.append((rows, snapshot(mem)))
    assert all(r == results[0] for r in results[1:])
    mem = new_mem(kind, True, 40, 5)
    before = snapshot(mem)
    for bad, exc in ((np.zeros((2, 1), np.int32), ValueError), (np.array([0.0, 1.0]), TypeError),
                     (np.array([0, 0], np.int32), ValueError), (np.array([0, 9], np.int32), ValueError)):
        with pytest.raises(exc):
            mem.decode_step(bad)
        assert snapshot(mem) == before
        assert not mem.lock.locked()  # a refused step leaves the lock free


def test_decode_step_k_idxs_are_cached_fresh_and_invalidated():
    cache = KVCache(1, 4, 4, 32, n_seq_max=3, dtype_k=np.float32, dtype_v=np.float32, v_trans=False)
    ctx = cache.decode_step(np.array([2, 0], np.int32))
    rows = ctx.k_idxs()
    assert rows.dtype == np.int64 and rows.tolist() == ctx.slot_cells().tolist()
    assert ctx.k_idxs() is rows and ctx.v_idxs() is rows  # computed once by the step
    buf = np.empty(2, np.int64)
    assert ctx.k_idxs(out=buf) is buf and buf.tolist() == rows.tolist()
    kept = rows.copy()
    ctx2 = cache.decode_step([2, 0])
    assert rows.tolist() == kept.tolist()  # each step returns its own array: older ones keep their rows
    assert ctx2.k_idxs().tolist() != kept.tolist()
    with pytest.raises(llmem.StaleContextError):
        ctx.k_idxs()
    with pytest.raises(llmem.StaleContextError):
        ctx.v_idxs()
    assert ctx2.next() is False
    with pytest.raises(LlmemError):
        ctx2.k_idxs()  # moved past its only micro-batch
    # the lock: a caller may hold it around the step (re-entrant); it is free afterwards
    with cache.lock:
        cache.decode_step([1])
    assert not cache.lock.locked()
    # a general context computes its rows per micro-batch, after apply
    gen = cache.init_batch(Batch(token=np.zeros(4, np.int32), seq_id=np.array([1, 1, 1, 1], np.int32)), 2)
    gen.apply()
    first = gen.k_idxs()
    assert gen.k_idxs() is first
    assert gen.next() is True
    with pytest.raises(LlmemError, match="apply"):
        gen.k_idxs()
    gen.apply()
    assert gen.k_idxs().tolist() == gen.slot_cells().tolist() != first.tolist()


def test_decode_step_context_is_what_init_makes():
    # the compiled step builds KVCacheContext from its slots (no __init__): every slot as __init__
    # would set it, and the fast build is in use for llmem's own context types
    from llmem import _core
    from llmem.kv_cache import KVCacheContext, KVCacheISWAContext
    assert _core._decode_step_fast_layout("kv", KVCacheContext)
    assert _core._decode_step_fast_layout("iswa", KVCacheISWAContext)
    cache = KVCache(1, 4, 4, 32, n_seq_max=3, dtype_k=np.float32, dtype_v=np.float32, v_trans=False)
    ctx = cache.decode_step([0, 2], [5, 6])
    ref = KVCacheContext(cache, ctx._ctx, cache._version, ctx._kidx)
    for name in KVCacheContext.__slots__:
        assert hasattr(ctx, name) == hasattr(ref, name), name
        if hasattr(ref, name):
            assert getattr(ctx, name) is getattr(ref, name) or getattr(ctx, name) == getattr(ref, name), name
    assert not hasattr(ctx, "_no_room")  # __init__ leaves it unset too
    assert type(ctx) is KVCacheContext and ctx._cache is cache and ctx._version == cache._version
    mem = new_mem("iswa", True, 40, 3)
    ictx = mem.decode_step([1])
    assert type(ictx) is KVCacheISWAContext and ictx._mem is mem and not hasattr(ictx, "_no_room")
    assert ictx.base._cache is mem.base and ictx.swa._cache is mem.swa


def test_decode_step_context_types_it_cannot_build_are_called():
    # a type with other slots, a __dict__ or its own __new__ is called (its __init__ runs)
    from llmem import _core
    from llmem.kv_cache import KVCacheContext

    class Extra(KVCacheContext):
        __slots__ = ("extra",)

        def __init__(self, *args):
            super().__init__(*args)
            self.extra = "init ran"

    class WithDict(KVCacheContext):
        def __init__(self, *args):
            super().__init__(*args)
            self.extra = "init ran"

    for kind in (Extra, WithDict):
        assert not _core._decode_step_fast_layout("kv", kind)
        cache = KVCache(1, 4, 4, 32, n_seq_max=2, dtype_k=np.float32, dtype_v=np.float32)
        ctx = _core.kv_decode_step(cache, [0, 1], None, kind)
        assert type(ctx) is kind and ctx.extra == "init ran"
        assert ctx.k_idxs().tolist() == ctx.slot_cells().tolist()
    with pytest.raises(ValueError, match="kind"):
        _core._decode_step_fast_layout("other", KVCacheContext)


def test_decode_step_reuses_only_what_nobody_holds():
    import weakref
    # the compiled contexts and k-row arrays of earlier steps are reused once nothing references
    # them: anything a caller kept (the context, its k rows, a view, the compiled context) keeps
    # its values through later steps
    cache = KVCache(1, 4, 4, 256, n_seq_max=4, dtype_k=np.float32, dtype_v=np.float32, v_trans=False)
    ids = np.arange(4, dtype=np.int32)
    kept_ctx = cache.decode_step(ids)
    expect = [kept_ctx.k_idxs().copy()]
    kept_rows = cache.decode_step(ids).k_idxs()
    expect.append(kept_rows.copy())
    kept_view = cache.decode_step(ids).k_idxs()[1:]
    expect.append(kept_view.copy())
    kept_compiled = cache.decode_step(ids)._ctx
    expect.append(kept_compiled.slot_cells())
    # with nothing held, the ring keeps an earlier step's k-row array (a weak reference sees it
    # alive after the context is gone) and a later step hands that same array out again
    ctx = cache.decode_step(ids)
    ring_rows = weakref.ref(ctx.k_idxs())
    del ctx
    reused = 0
    for _ in range(20):
        ctx = cache.decode_step(ids)
        assert ctx.k_idxs().tolist() == ctx.slot_cells().tolist()
        assert ring_rows() is not None
        reused += ctx.k_idxs() is ring_rows()
        del ctx
    assert reused > 0
    assert kept_ctx._ctx.slot_cells().tolist() == expect[0].tolist()
    assert kept_ctx._kidx.tolist() == expect[0].tolist()
    assert kept_rows.tolist() == expect[1].tolist() and kept_view.tolist() == expect[2].tolist()
    assert kept_compiled.slot_cells().tolist() == expect[3].tolist()
    # a different number of sequences gets arrays of its length
    ctx = cache.decode_step([1, 3])
    assert ctx.k_idxs().shape == (2,) and ctx.k_idxs().tolist() == ctx.slot_cells().tolist()
    assert cache.seq_pos_max(1) == 25 and cache.seq_pos_max(0) == 24  # 25 and 26 steps


def test_decode_step_leaves_no_reference_cycle():
    # the ring of reusable objects lives on the cache and references nothing that references the
    # cache: dropping the cache frees it (and its buffers) without the cycle collector
    import gc
    import weakref
    cache = KVCache(1, 4, 4, 64, n_seq_max=2, dtype_k=np.float32, dtype_v=np.float32)
    probe = weakref.ref(cache._k[0])  # the cache's K buffer (a numpy array) dies with it
    for _ in range(5):
        cache.decode_step([0, 1]).k_idxs()
    gc.disable()
    try:
        del cache
        assert probe() is None
    finally:
        gc.enable()


def test_decode_step_without_tokens_on_the_general_path():
    # per-sequence streams, ids not consecutive: several micro-batches, the general path; without
    # tokens its batch carries token ids 0 (the allocator needs ids), the cells as with tokens
    a = KVCache(1, 4, 4, 8, n_seq_max=3, unified=False, dtype_k=np.float32, dtype_v=np.float32)
    b = KVCache(1, 4, 4, 8, n_seq_max=3, unified=False, dtype_k=np.float32, dtype_v=np.float32)
    got = a.decode_step([2, 0])
    want = general_step(b, [2, 0], [0, 0])
    assert got.ubatch.token.tolist() == [0] and snapshot(a) == snapshot(b)
    assert got.next() and want.next()
    got.apply()
    want.apply()
    assert got.k_idxs().tolist() == want.k_idxs().tolist() and snapshot(a) == snapshot(b)


def test_decode_step_invalidates_older_contexts():
    cache = KVCache(1, 4, 4, 16, n_seq_max=2, dtype_k=np.float32, dtype_v=np.float32)
    old = cache.init_batch(Batch(token=np.arange(2, dtype=np.int32)), 4)
    cache.decode_step([1])
    with pytest.raises(llmem.StaleContextError):
        old.apply()


def test_hybrid_contexts_expose_the_attention_metadata():
    from llmem.toy import ToyHybrid
    model = ToyHybrid(seed=1)
    mem = model.new_memory(32, n_seq_max=2)
    ctx = mem.init_batch(Batch(token=np.arange(4, dtype=np.int32), seq_id=np.array([0, 0, 1, 1], np.int32)), 8)
    ctx.apply()
    m = ctx.attn.kq_mask(dtype=np.float16, pad=4)
    assert m.dtype == np.float16 and m.shape[0] % 4 == 0
    assert ctx.attn.paged_kv().kv_indptr[-1] == 4


def _same_cells(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not _same_cells(x, y):
                return False
        elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not np.array_equal(np.asarray(x), np.asarray(y)):
                return False
        elif isinstance(x, list) and x and isinstance(x[0], np.ndarray):
            if len(x) != len(y) or not all(np.array_equal(p, q) for p, q in zip(x, y)):
                return False
        elif x != y:
            return False
    return True


def test_hybrid_decode_step_decides_as_init_batch_and_apply():
    from llmem.toy import ToyHybrid
    model = ToyHybrid(seed=2)
    a, b = model.new_memory(24, n_seq_max=3), model.new_memory(24, n_seq_max=3)
    rng = np.random.default_rng(5)
    steps = 0
    for _ in range(12):
        ids = sorted(rng.choice(3, int(rng.integers(1, 4)), replace=False).tolist())
        toks = rng.integers(0, 50, len(ids)).tolist()
        want = general_step(b, ids, toks)
        if want is None:
            before = a.cells()
            with pytest.raises(LlmemError, match="no room"):
                a.decode_step(ids, toks)
            assert _same_cells(a.cells(), before)
            break
        got = a.decode_step(ids, toks)
        assert got.ubatch.pos.tolist() == want.ubatch.pos.tolist()
        assert got.attn.k_idxs().tolist() == want.attn.k_idxs().tolist()
        assert _same_cells(a.cells(), b.cells())
        steps += 1
    assert steps >= 4
    before = a.cells()
    for bad, exc in [([], ValueError), ([0, 0], ValueError), ([5], ValueError), ([0.5], TypeError)]:
        with pytest.raises(exc):
            a.decode_step(bad)
        assert _same_cells(a.cells(), before)


def new_hybrid(iswa, unified, n_seq_max):
    from llmem import HybridISWAMemory, HybridMemory, RecurrentMemory
    size = 24 if unified else 8
    if iswa:
        attn = KVCacheISWA(2, 4, 4, size, n_seq_max=n_seq_max, unified=unified, n_swa=3, swa_type=SWAType.STANDARD,
                           is_swa_layer=[True, False], n_ubatch=4, dtype_k=np.float32, dtype_v=np.float32)
    else:
        attn = KVCache(2, 4, 4, size, n_seq_max=n_seq_max, unified=unified, layer_filter=lambda il: il < 2,
                       dtype_k=np.float32, dtype_v=np.float32)
    recr = RecurrentMemory(3, n_embd_r=[0, 0, 2], n_embd_s=[0, 0, 3], mem_size=n_seq_max, n_seq_max=n_seq_max,
                           n_rs_seq=1, layer_filter=[False, False, True])
    cls = HybridISWAMemory if iswa else HybridMemory
    return cls(attn=attn, recr=recr, is_recurrent_layer=[False, False, True])


def hybrid_snapshot(mem):
    attn = mem.mem_attn
    out = snapshot(attn)
    cells = mem.mem_recr.cells()
    return out, {k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in cells.items()}


@settings(max_examples=40, deadline=None)
@given(data=st.data(), iswa=st.booleans(), unified=st.booleans(), n_seq_max=st.integers(1, 4))
def test_hybrid_decode_step_decides_as_init_batch_and_apply_on_random_states(data, iswa, unified, n_seq_max):
    a = new_hybrid(iswa, unified, n_seq_max)  # decode_step (one compiled call)
    b = new_hybrid(iswa, unified, n_seq_max)  # init_batch + apply
    for _ in range(data.draw(st.integers(1, 10))):
        if data.draw(st.integers(0, 4)) == 0:
            s = data.draw(st.integers(0, n_seq_max - 1))
            a.seq_rm(s, -1, -1)
            b.seq_rm(s, -1, -1)
            continue
        ids = data.draw(st.lists(st.integers(0, n_seq_max - 1), min_size=1, max_size=n_seq_max, unique=True))
        toks = data.draw(st.none() | st.lists(st.integers(0, 99), min_size=len(ids), max_size=len(ids)))
        batch = Batch(token=np.zeros(len(ids), np.int32) if toks is None else np.asarray(toks, np.int32),
                      seq_id=np.asarray(ids, np.int32), output=np.ones(len(ids), bool))
        want = b.init_batch(batch, max(len(ids), b.mem_recr.n_rs_seq + 2))
        if want.status != llmem.Status.SUCCESS:
            before = hybrid_snapshot(a)
            with pytest.raises(LlmemError, match="no room"):
                a.decode_step(ids, toks)
            assert hybrid_snapshot(a) == before
            continue
        want.apply()
        got = a.decode_step(np.asarray(ids, np.int32) if data.draw(st.booleans()) else ids, toks)
        assert hybrid_snapshot(a) == hybrid_snapshot(b)
        while True:
            assert got.ubatch.pos.tolist() == want.ubatch.pos.tolist()
            assert got.ubatch.token.tolist() == want.ubatch.token.tolist()
            assert got.recr.s_copy_all().tolist() == want.recr.s_copy_all().tolist()
            for cg, cw in zip(sub_contexts(got.attn), sub_contexts(want.attn)):
                assert cg.k_idxs().tolist() == cw.k_idxs().tolist()
                np.testing.assert_array_equal(cg.kq_mask(), cw.kq_mask())
            if not want.next():
                assert got.next() is False
                break
            assert got.next() is True
            want.apply()
            got.apply()
        assert hybrid_snapshot(a) == hybrid_snapshot(b)
    a.clear()
    old = a.init_batch(Batch(token=np.zeros(1, np.int32)), 4)
    a.decode_step([0])
    with pytest.raises(llmem.StaleContextError):
        old.apply()  # the compiled step made older plans stale, as apply does


def mask_from_lists(ctx, causal, n_rows, n_kv):
    offs, cells = ctx.kq_cells(causal)
    m = np.full((n_rows, n_kv), -np.inf, np.float32)
    for t in range(len(offs) - 1):
        m[t, cells[offs[t]:offs[t + 1]]] = 0
    return m


@pytest.mark.parametrize("unified", [True, False])
def test_large_masks_streamed_and_unaligned_buffers(unified):
    """Masks of 1 MiB and more take the streaming stores; misaligned buffers the scalar path."""
    n_seq = 4
    cache = KVCache(1, 4, 4, 8192 if unified else 2048, n_seq_max=n_seq, unified=unified,
                    dtype_k=np.float32, dtype_v=np.float32, n_pad=256)
    rng = np.random.default_rng(11)
    for _ in range(3):  # prefill every sequence by interleaved chunks
        k = 300
        ids = np.repeat(np.arange(n_seq, dtype=np.int32), k)
        ctx = cache.init_batch(Batch(token=np.zeros(len(ids), np.int32), seq_id=ids), len(ids))
        for _ub in ctx:
            pass
    cache.seq_rm(1, 100, 200)  # a hole in one sequence
    ids = np.repeat(np.arange(n_seq, dtype=np.int32), 70)
    if unified:
        rng.shuffle(ids)
    ctx = cache.init_batch(Batch(token=np.zeros(len(ids), np.int32), seq_id=ids), len(ids))
    ctx.apply()
    for causal in (True, False):
        m = ctx.kq_mask(causal)
        assert m.nbytes >= 1 << 20
        np.testing.assert_array_equal(m, mask_from_lists(ctx, causal, m.shape[0], ctx.n_kv))
        np.testing.assert_array_equal(ctx.kq_mask(causal, dtype=np.float16).astype(np.float32), m)
        raw = bytearray(m.nbytes + 2)
        view = np.frombuffer(memoryview(raw)[2:], np.float32).reshape(m.shape)  # 2-byte aligned
        ctx.kq_mask(causal, out=view)
        np.testing.assert_array_equal(view, m)
        raw16 = bytearray(m.size * 2 + 2)
        view16 = np.frombuffer(memoryview(raw16)[2:], np.float16).reshape(m.shape)  # 16-byte misaligned
        ctx.kq_mask(causal, out=view16, dtype=np.float16)
        np.testing.assert_array_equal(view16.astype(np.float32), m)
        padded = ctx.kq_mask(causal, pad=64)
        n_groups = 1 if unified else n_seq
        blocks = padded.reshape(n_groups, -1, ctx.n_kv)
        n_tps = m.shape[0] // n_groups
        np.testing.assert_array_equal(blocks[:, :n_tps].reshape(m.shape), m)
        assert np.isneginf(blocks[:, n_tps:]).all()
