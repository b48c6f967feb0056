"""llama.cpp b11312 and b11549 behaviour sets (docs/compat.md): the cases written from the
b11549 source reading (llama-kv-cache.cpp state_write_data/state_read_data,
llama-memory-recurrent.cpp seq_rm and constructor)."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import llmem
from llmem import Compat, KVCache, KVCacheISWA, RecurrentMemory, StateError, SWAType
from llmem.hparams import ModelHParams
from llmem.plan import plan_memory


def _cache(fmt=None, compat=None, unified=True, n_seq_max=1, **kw) -> KVCache:
    args = dict(kv_size=16, n_seq_max=n_seq_max, unified=unified, state_format=fmt, compat=compat)
    args.update(kw)
    return KVCache(2, 32, 32, **args)


def _decode(cache, seqs, n: int = 3, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for seq in seqs:
        batch = llmem.Batch(token=np.arange(n, dtype=np.int32), seq_id=np.full(n, seq, np.int32))
        ctx = cache.init_batch(batch, n_ubatch=n)
        for _ub in ctx:
            for il in cache.layers:
                ctx.cpy_k(il, rng.standard_normal((n, 32)).astype(np.float32))
                ctx.cpy_v(il, rng.standard_normal((n, 32)).astype(np.float32))


def test_defaults_follow_b11549() -> None:
    assert llmem.compat.DEFAULT_COMPAT is Compat.B11549
    assert _cache().state_format == 4
    assert _cache(compat="b11312").state_format == 3
    assert _cache(fmt=3).state_format == 3
    assert _cache(fmt=4, compat="b11312").state_format == 4
    with pytest.raises(ValueError, match="state_format"):
        _cache(fmt=5)
    with pytest.raises(ValueError, match="compat"):
        _cache(compat="b9999")


@pytest.mark.parametrize("unified", [True, False])
def test_format_4_has_rotation_fields_after_n_layer(unified: bool) -> None:
    """Case 1: n_rot_k, n_rot_v right after n_layer in every non-empty stream, 8 bytes each."""
    n_seq = 1 if unified else 2
    c3 = _cache(3, unified=unified, n_seq_max=n_seq)
    c4 = _cache(4, unified=unified, n_seq_max=n_seq, n_rot_k=128, n_rot_v=64)
    _decode(c3, [0])
    _decode(c4, [0])
    b3, b4 = c3.state_write(), c4.state_write()
    assert len(b4) - len(b3) == 8  # one non-empty stream; an empty one has no section
    off = 4 + 4 + 3 * 12  # n_stream, cell_count, 3 cells of seq 0
    assert struct.unpack_from("<II", b3, off) == (1, 2)
    assert struct.unpack_from("<IIII", b4, off) == (1, 2, 128, 64)
    assert b3[off + 8:off + 20] == b4[off + 16:off + 28]  # layer 0's K type and row size follow
    if not unified:
        assert struct.unpack_from("<I", b4, len(b4) - 4) == (0,)  # stream 1: cell_count 0, nothing else


@pytest.mark.parametrize("write_fmt,read_fmt", [(3, 4), (4, 3), (3, 3), (4, 4)])
def test_both_formats_restore_into_either(write_fmt: int, read_fmt: int) -> None:
    """Case 2."""
    src = _cache(write_fmt, n_seq_max=2)
    _decode(src, [0, 1])
    dst = _cache(read_fmt, n_seq_max=2)
    dst.state_read(src.state_write())
    assert dst.cells()["seqs"] == src.cells()["seqs"]
    for il in (0, 1):
        np.testing.assert_array_equal(dst.k(il), src.k(il))
        np.testing.assert_array_equal(dst.v(il), src.v(il))
    seq = _cache(read_fmt, n_seq_max=2)
    seq.state_read(src.state_write(1), 0)
    assert seq.seq_pos_max(0) == 2
    # written back in the reader's format
    again = _cache(write_fmt, n_seq_max=2)
    again.state_read(dst.state_write())
    assert again.state_write() == src.state_write()


def test_rotation_mismatch_is_refused() -> None:
    """Case 3: b11549 refuses a section whose rotation sizes differ from the cache's."""
    src = _cache(4, dtype_k="q8_0", n_rot_k=64)
    _decode(src, [0])
    blob = src.state_write(0)
    for other in (dict(n_rot_k=128), dict(n_rot_k=64, n_rot_v=64)):
        dst = _cache(4, dtype_k="q8_0", **other)
        _decode(dst, [0], seed=5)
        before = dst.state_write()
        with pytest.raises(StateError, match="rotation"):
            dst.state_read(blob, 0)
        assert dst.state_write() == before


def test_iswa_sections_follow_the_format() -> None:
    def make(fmt):
        return KVCacheISWA(2, 32, 32, kv_size=256, n_swa=4, swa_type=SWAType.STANDARD,
                           is_swa_layer=[True, False], n_ubatch=8, state_format=fmt)
    a, b = make(3), make(4)
    _decode(a, [0])
    _decode(b, [0])
    assert len(b.state_write(0)) - len(a.state_write(0)) == 16  # base and swa sections
    c = make(4)
    c.state_read(a.state_write(0), 0)
    assert c.state_write(0) == b.state_write(0) or c.seq_pos_max(0) == 2


def _hp(head: int) -> ModelHParams:
    return ModelHParams(arch="llama", n_layer=2, n_embd=4 * head, n_head=4, n_head_kv=2, n_ctx_train=4096)


@pytest.mark.parametrize("head,want", [(64, (64, 64)), (128, (128, 64)), (256, (256, 64)), (96, (0, 0))])
def test_plan_rotation_sizes(head: int, want) -> None:
    """Case 4: llama.cpp b11549's n_rot_k / n_rot_v."""
    plan = plan_memory(_hp(head), 256, type_k="q8_0", type_v="q8_0", flash_attn=True)
    assert (plan.kv.n_rot_k, plan.kv.n_rot_v) == want
    mem = llmem.from_hparams(_hp(head), 256, type_k="q8_0", type_v="q8_0", flash_attn=True)
    assert (mem.n_rot_k, mem.n_rot_v) == want and mem.state_format == 4
    f16 = plan_memory(_hp(head), 256)
    assert (f16.kv.n_rot_k, f16.kv.n_rot_v) == (0, 0)
    old = llmem.from_hparams(_hp(head), 256, type_k="q8_0", flash_attn=True, compat="b11312")
    assert old.state_format == 3 and old.n_rot_k == want[0]


@pytest.mark.parametrize("compat", ["b11312", "b11549"])
def test_recurrent_shared_cell_rollback(compat: str) -> None:
    """Case 5: b11312 rewinds a shared cell for every sequence; b11549 refuses."""
    mem = RecurrentMemory(1, 4, 4, mem_size=2, n_seq_max=2, n_rs_seq=1, compat=compat)
    batch = llmem.Batch(token=np.arange(3, dtype=np.int32), seq_id=np.zeros(3, np.int32))
    ctx = mem.init_batch(batch, n_ubatch=3)
    for _ub in ctx:
        pass
    mem.seq_cp(0, 1)
    assert (mem.seq_pos_max(0), mem.seq_pos_max(1)) == (2, 2)
    ok = mem.seq_rm(0, 2, -1)
    if compat == "b11312":
        assert ok and (mem.seq_pos_max(0), mem.seq_pos_max(1)) == (1, 1)
    else:
        assert not ok and (mem.seq_pos_max(0), mem.seq_pos_max(1)) == (2, 2)


@pytest.mark.parametrize("compat", ["b11312", "b11549"])
def test_recurrent_without_layers(compat: str) -> None:
    """Case 6: b11549 forces n_rs_seq = 0 and rolls back the position alone."""
    mem = RecurrentMemory(2, 4, 4, mem_size=1, n_seq_max=1, n_rs_seq=2, layer_filter=lambda il: False,
                          compat=compat)
    batch = llmem.Batch(token=np.arange(6, dtype=np.int32), seq_id=np.zeros(6, np.int32))
    ctx = mem.init_batch(batch, n_ubatch=6)
    for _ub in ctx:
        pass
    assert mem.seq_pos_max(0) == 5
    if compat == "b11549":
        assert mem.n_rs_seq == 0
        assert mem.seq_rm(0, 2, -1) and mem.seq_pos_max(0) == 1
    else:
        assert mem.n_rs_seq == 2
        assert not mem.seq_rm(0, 2, -1) and mem.seq_pos_max(0) == 5


@pytest.mark.parametrize("compat", ["b11312", "b11549"])
def test_p_array_in_both_builds(compat: str) -> None:
    """Case 8: b11312 and b11549 write a layer's P rows (u64 row size, rows) right after its r rows."""
    mem = RecurrentMemory(2, 2, 1, mem_size=1, n_seq_max=1, n_embd_p=[3, 0], compat=compat)
    batch = llmem.Batch(token=np.arange(2, dtype=np.int32), seq_id=np.zeros(2, np.int32))
    ctx = mem.init_batch(batch, n_ubatch=2)
    for _ub in ctx:
        for il in (0, 1):
            ctx.store_r(il, np.full((1, 2), 1.0 + il, np.float32))
            ctx.store_s(il, np.full((1, 1), -1.0 - il, np.float32))
        ctx.store_p(0, np.array([[7.0, 8.0, 9.0]], np.float32))
    blob = mem.state_write(0)
    # cell count, pos, n_ids, s_trans, n_layer | layer 0: type, 8, r row, 12, P row | layer 1: type, 8, r row | s...
    assert struct.unpack_from("<IiIII", blob, 0) == (1, 1, 0, 0, 2)
    assert struct.unpack_from("<iqff", blob, 20) == (0, 8, 1.0, 1.0)
    assert struct.unpack_from("<qfff", blob, 40) == (12, 7.0, 8.0, 9.0)
    assert struct.unpack_from("<iqff", blob, 60) == (0, 8, 2.0, 2.0)
    assert len(blob) == 80 + 2 * (12 + 4)
    other = RecurrentMemory(2, 2, 1, mem_size=1, n_seq_max=1, n_embd_p=[3, 0],
                            compat="b11549" if compat == "b11312" else "b11312")
    other.state_read(blob, 0)
    assert other.state_write(0) == blob
    with pytest.raises(StateError):
        RecurrentMemory(2, 2, 1, mem_size=1, n_seq_max=1, n_embd_p=[4, 0], compat=compat).state_read(blob, 0)
