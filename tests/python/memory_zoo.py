"""One small instance of every memory type, filled the same way, and what a test needs to treat
them alike: a decode that writes recognisable K/V rows and states, and a snapshot of everything
observable (state bytes, cell metadata, every buffer) to show that a refused call changed nothing.
"""

import hashlib

import numpy as np

from llmem import (Batch, HybridISWAMemory, HybridMemory, KVCache, KVCacheISWA, RecurrentMemory, Rope,
                   Status, SWAType)

N_SEQ = 4
ROPE = Rope(n_rot=4)


def kv_cache():
    return KVCache(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=64, n_seq_max=N_SEQ, rope=ROPE)


def kv_cache_streams():
    return KVCache(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=32, n_seq_max=N_SEQ, unified=False,
                   dtype_k=np.float32, dtype_v=np.float32, v_trans=False, rope=ROPE)


def kv_iswa():
    return KVCacheISWA(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=64, n_seq_max=N_SEQ, n_swa=4,
                       swa_type=SWAType.STANDARD, is_swa_layer=[True, False], n_ubatch=8, rope=ROPE)


def recurrent():
    return RecurrentMemory(n_layer=2, n_embd_r=4, n_embd_s=6, mem_size=N_SEQ, n_seq_max=N_SEQ, n_rs_seq=2)


def hybrid():
    attn = KVCache(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=64, n_seq_max=N_SEQ,
                   layer_filter=lambda il: il == 0, rope=ROPE)
    recr = RecurrentMemory(n_layer=2, n_embd_r=[0, 4], n_embd_s=[0, 6], mem_size=N_SEQ, n_seq_max=N_SEQ,
                           layer_filter=[False, True])
    return HybridMemory(attn=attn, recr=recr, is_recurrent_layer=[False, True])


def hybrid_iswa():
    attn = KVCacheISWA(n_layer=3, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=64, n_seq_max=N_SEQ, n_swa=4,
                       swa_type=SWAType.STANDARD, is_swa_layer=[True, False, False], n_ubatch=8,
                       layer_filter=lambda il: il < 2, rope=ROPE)
    recr = RecurrentMemory(n_layer=3, n_embd_r=[0, 0, 4], n_embd_s=[0, 0, 6], mem_size=N_SEQ, n_seq_max=N_SEQ,
                           layer_filter=[False, False, True])
    return HybridISWAMemory(attn=attn, recr=recr, is_recurrent_layer=[False, False, True])


MEMORIES = {
    "kv": kv_cache,
    "kv_streams": kv_cache_streams,
    "kv_iswa": kv_iswa,
    "recurrent": recurrent,
    "hybrid": hybrid,
    "hybrid_iswa": hybrid_iswa,
}


def kv_parts(mem, ctx):
    """(KVCacheContext, its cache) for every attention cache a context drives."""
    if isinstance(mem, (HybridMemory, HybridISWAMemory)):
        return kv_parts(mem.mem_attn, ctx.attn)
    if isinstance(mem, KVCacheISWA):
        return [(ctx.base, mem.base), (ctx.swa, mem.swa)]
    if isinstance(mem, KVCache):
        return [(ctx, mem)]
    return []


def recurrent_parts(mem, ctx):
    """(RecurrentContext, its memory) for the recurrent part a context drives."""
    if isinstance(mem, (HybridMemory, HybridISWAMemory)):
        return [(ctx.recr, mem.mem_recr)]
    if isinstance(mem, RecurrentMemory):
        return [(ctx, mem)]
    return []


def write_rows(mem, ctx, ubatch, salt=0.0):
    """What the model would write for a micro-batch: K/V rows and new states derived from the
    tokens' positions and sequences (so that two runs of the same decodes write the same bytes)."""
    for kctx, cache in kv_parts(mem, ctx):
        rows = (ubatch.pos[:, None] * 8 + np.arange(8)[None, :] + ubatch.seq_id[:, :1] + salt) % 1000
        for il in cache.layers:
            kctx.cpy_k(il, rows.astype(np.float32))
            kctx.cpy_v(il, (rows + 0.5).astype(np.float32))
    for rctx, memory in recurrent_parts(mem, ctx):
        for il in range(memory.n_layer):
            if memory.has_layer(il):
                rctx.store_r(il, rctx.get_r(il) + 1)
                rctx.store_s(il, rctx.get_s(il) + ubatch.n_seq_tokens + salt)


def decode(mem, seq_id, n_tokens, n_ubatch=8, salt=0.0):
    """Decode ``n_tokens`` more tokens of one sequence (positions continue from the memory)."""
    batch = Batch(token=np.ones(n_tokens, np.int32), seq_id=np.full(n_tokens, seq_id, np.int32))
    ctx = mem.init_batch(batch, n_ubatch)
    if ctx.status != Status.SUCCESS:
        return ctx.status
    for ubatch in ctx:
        write_rows(mem, ctx, ubatch, salt)
    return ctx.status


def filled(name):
    """A memory of kind ``name`` holding sequences 0..2 (3, 5 and 2 tokens)."""
    mem = MEMORIES[name]()
    for seq_id, n in ((0, 3), (1, 5), (2, 2)):
        assert decode(mem, seq_id, n) == Status.SUCCESS
    return mem


def _caches(mem):
    if isinstance(mem, (HybridMemory, HybridISWAMemory)):
        return _caches(mem.mem_attn) + _caches(mem.mem_recr)
    if isinstance(mem, KVCacheISWA):
        return [mem.base, mem.swa]
    return [mem]


def buffers(mem):
    """Every state array a memory owns."""
    out = []
    for part in _caches(mem):
        if isinstance(part, KVCache):
            out += [part.k(il) for il in part.layers] + [part.v(il) for il in part.layers]
        else:
            out += [a for il in range(part.n_layer) if part.has_layer(il) for a in (part.r(il), part.s(il))]
    return out


def snapshot(mem):
    """Everything observable about a memory: state bytes, cell metadata (with heads and rollback
    depths), the used count and a hash of every buffer."""
    h = hashlib.sha256()
    for a in buffers(mem):
        h.update(a.tobytes())
    meta = [repr(sorted((k, repr(v)) for k, v in part.cells().items())) for part in _caches(mem)]
    extra = [part.rs_idx().tolist() for part in _caches(mem) if isinstance(part, RecurrentMemory)]
    return mem.state_write(-1), meta, extra, mem.used, h.hexdigest()
