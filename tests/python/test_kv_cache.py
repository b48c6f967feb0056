"""The public KVCache / KVCacheISWA surface: buffers, contexts, K-shift numerics, state bytes,
atomic failures and argument checking."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import llmem
from llmem import Batch, KVCache, KVCacheISWA, LlmemError, Rope, StateError, Status, SWAType


def decode(mem, seqs, pos, n_ubatch=512, k_of=None, v_of=None):
    """Place one batch; write K/V rows (k_of(seq, pos) -> row) for every layer. Returns the
    contexts' cell lists."""
    batch = Batch(token=np.arange(len(pos), dtype=np.int32), pos=np.asarray(pos, np.int32),
                  seq_id=seqs if isinstance(seqs, list) else np.asarray(seqs, np.int32))
    ctx = mem.init_batch(batch, n_ubatch)
    if ctx.status != Status.SUCCESS:
        return None
    cells = []
    for ub in ctx:
        cells.append(ctx.slot_cells().tolist())
        tok_seq = [ids[0] for ids in ub.seq_id_list]
        for il in mem.layers:
            if k_of is not None:
                ctx.cpy_k(il, np.stack([k_of(s, p, il) for s, p in zip(tok_seq, ub.pos.tolist())]))
            if v_of is not None:
                ctx.cpy_v(il, np.stack([v_of(s, p, il) for s, p in zip(tok_seq, ub.pos.tolist())]))
    return cells


def snapshot(mem):
    c = mem.cells()
    return (c["pos"].copy(), c["seqs"], c["shift"].copy(), c["head"],
            [mem.k(il).tobytes() for il in mem.layers], [mem.v(il).tobytes() for il in mem.layers])


def assert_same(a, b):
    assert np.array_equal(a[0], b[0])
    assert a[1] == b[1]
    assert np.array_equal(a[2], b[2])
    assert a[3] == b[3]
    assert a[4] == b[4] and a[5] == b[5]


# -- construction and arguments ---------------------------------------------------------------

def test_buffers_shapes_and_dtypes():
    c = KVCache(3, [8, 16, 8], [4, 4, 12], 32, n_seq_max=2, unified=False, dtype_k=np.float32,
                dtype_v="bf16", layer_filter=lambda il: il != 1)
    assert c.layers == [0, 2]
    assert c.k(0).shape == (2, 32, 8) and c.k(0).dtype == np.float32
    assert c.v(2).shape == (2, 12, 32) and c.v(2).dtype == np.uint16  # E_vmax over all model layers
    assert c.memory_breakdown() == {"CPU": 2 * 32 * 8 * 4 * 2 + 2 * 12 * 32 * 2 * 2}
    with pytest.raises(ValueError, match="layer 1"):
        c.k(1)
    d = KVCache(1, 8, 4, 16, v_trans=False)
    assert d.v(0).shape == (1, 16, 4) and d.v(0).dtype == np.float16


@pytest.mark.parametrize("kwargs, exc", [
    (dict(kv_size=0), ValueError),
    (dict(kv_size=10, n_pad=4), ValueError),
    (dict(n_seq_max=0), ValueError),
    (dict(dtype_k=np.int32), ValueError),
    (dict(dtype_k="q3_k"), ValueError),  # a ggml type llama.cpp's cache does not offer
    (dict(n_embd_k_gqa=[8, 8, 8]), ValueError),
    (dict(swa_type=SWAType.STANDARD, n_swa=0), ValueError),
    (dict(rope=dict(n_rot=4, head_dim=3)), ValueError),  # Rope() itself refuses it too
    (dict(rope="yes"), TypeError),
    (dict(kv_size=8.0), TypeError),
])
def test_bad_construction_raises(kwargs, exc):
    args = dict(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=16)
    args.update(kwargs)
    with pytest.raises(exc):
        KVCache(**args)


def test_bad_sequence_arguments_raise_and_change_nothing():
    c = KVCache(1, 4, 4, 16, n_seq_max=2)
    decode(c, [0, 0, 1], [0, 1, 0])
    before = snapshot(c)
    for call in (lambda: c.seq_rm(-2), lambda: c.seq_rm(256), lambda: c.seq_cp(0, 2),
                 lambda: c.seq_keep(-1), lambda: c.seq_add(0, 0, 1, 2**31),
                 lambda: c.seq_div(0, 0, -1, 0), lambda: c.seq_pos_max(1 << 40),
                 lambda: c.state_write(300), lambda: c.state_read(b"", 5)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(TypeError):
        c.seq_rm("0")
    with pytest.raises(TypeError):
        c.init_batch([1, 2], 4)
    with pytest.raises(ValueError):
        c.init_batch(Batch(token=np.array([1], np.int32)), 0)
    assert_same(before, snapshot(c))


def test_seq_add_overflow_is_refused():
    c = KVCache(1, 4, 4, 8)
    decode(c, [0], [2**31 - 3])
    with pytest.raises(ValueError, match="overflows"):
        c.seq_add(0, -1, -1, 10)
    assert c.seq_pos_max(0) == 2**31 - 3


# -- decode, contexts, masks --------------------------------------------------------------------

def test_decode_loop_writes_rows_where_the_cells_are():
    c = KVCache(2, 4, 4, 16, n_seq_max=2, dtype_k=np.float32, dtype_v=np.float32)
    row = lambda s, p, il: np.full(4, 100 * il + 10 * s + p, np.float32)
    assert decode(c, [0, 0, 0, 1, 1], [0, 1, 2, 0, 1], n_ubatch=2, k_of=row, v_of=row) == \
        [[0, 1], [2, 3], [4]]
    assert c.k(1)[0, 3].tolist() == [110.0] * 4
    assert c.v(1)[0, :, 4].tolist() == [111.0] * 4  # transposed V: column = cell
    ctx = c.init_batch(Batch(token=np.array([7], np.int32), seq_id=np.array([1], np.int32)), 4)
    assert ctx.ubatch.pos.tolist() == [2]  # positions continue from the cache
    ctx.apply()
    assert ctx.n_kv == 16 and ctx.head == 5
    assert ctx.k_idxs().tolist() == [5]
    assert ctx.v_idxs().tolist() == [5, 21, 37, 53]
    assert ctx.get_k(0).shape == (1, 16, 4) and ctx.get_v(0).shape == (1, 4, 16)
    mask = ctx.kq_mask()
    assert mask.dtype == np.float32 and mask.shape == (1, 16)
    assert np.isinf(mask[0]).tolist() == [True] * 3 + [False, False, False] + [True] * 10
    offs, cells = ctx.kq_cells()
    assert offs.tolist() == [0, 3] and cells.tolist() == [3, 4, 5]


def test_cpy_arguments_are_checked():
    c = KVCache(1, 4, 4, 8)
    ctx = c.init_batch(Batch(token=np.array([1, 2], np.int32)), 8)
    ctx.apply()
    with pytest.raises(ValueError, match="shape"):
        ctx.cpy_k(0, np.zeros((3, 4), np.float32))
    with pytest.raises(TypeError):
        ctx.cpy_v(0, np.zeros((2, 4), np.int64))
    ctx.cpy_k(0, np.ones((2, 2, 2), np.float32))  # [n_tokens, n_head, head_dim] is fine
    ctx.cpy_k(0, np.ones((4, 4), np.float32)[::2])  # a strided view is fine too
    assert c.k(0)[0, 1].tolist() == [1.0] * 4


def test_bf16_storage_rounds_to_nearest_even():
    c = KVCache(1, 4, 4, 8, dtype_k="bf16", v_trans=False, dtype_v="bf16")
    ctx = c.init_batch(Batch(token=np.array([1], np.int32)), 8)
    ctx.apply()
    vals = np.array([[1.0, -2.5, 1.00390625, 3.0e38]], np.float32)
    ctx.cpy_k(0, vals)
    back = (c.k(0)[0, 0].astype(np.uint32) << 16).view(np.float32)
    assert back.tolist()[:3] == [1.0, -2.5, 1.0]  # 1 + 2^-8 is a tie: rounds to even (1.0)
    assert np.isfinite(back[3])


def test_failed_init_batch_changes_nothing():
    c = KVCache(1, 4, 4, 8, n_seq_max=2)
    decode(c, [0] * 6, list(range(6)))
    before = snapshot(c)
    ctx = c.init_batch(Batch(token=np.arange(3, dtype=np.int32), seq_id=np.ones(3, np.int32)), 2)
    assert ctx.status == Status.FAILED_PREPARE
    assert ctx.ubatch is None
    with pytest.raises(LlmemError):
        ctx.apply()
    with pytest.raises(LlmemError):
        list(ctx)
    assert_same(before, snapshot(c))


def test_init_full_and_update_contexts():
    c = KVCache(1, 4, 4, 64, n_seq_max=2, unified=False, rope=Rope(4))
    full = c.init_full()
    assert full.status == Status.SUCCESS and full.n_kv == 64 and full.ubatch is None
    assert c.init_update().status == Status.NO_UPDATE


# -- K-shift ------------------------------------------------------------------------------------

def rope_ref(x, p, n_rot, base, scale, neox):
    """ggml RoPE of the first n_rot elements of each head (float64)."""
    x = np.asarray(x, np.float64).copy()
    half = n_rot // 2
    theta = scale * p * base ** (-2.0 * np.arange(half) / n_rot)
    cs, sn = np.cos(theta), np.sin(theta)
    if neox:
        ia, ib = np.arange(half), np.arange(half) + half
    else:
        ia, ib = np.arange(0, n_rot, 2), np.arange(1, n_rot, 2)
    a, b = x[..., ia].copy(), x[..., ib].copy()
    x[..., ia] = a * cs - b * sn
    x[..., ib] = a * sn + b * cs
    return x


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float16, 4e-3), ("bf16", 3e-2)])
@pytest.mark.parametrize("neox", [False, True])
def test_k_shift_equals_rotating_from_scratch(dtype, tol, neox):
    n_head, head_dim, n_rot = 2, 8, 6
    rope = Rope(n_rot, head_dim=head_dim, freq_base=500.0, freq_scale=0.5,
                mode="neox" if neox else "normal")
    c = KVCache(2, n_head * head_dim, 4, 32, n_seq_max=2, dtype_k=dtype, rope=rope)
    rng = np.random.default_rng(0)
    base_k = rng.standard_normal((2, 2, 40, n_head, head_dim))  # [layer, seq, pos, head, dim]

    def k_at(s, p, il, shift=0):
        return rope_ref(base_k[il, s, p], p + shift, n_rot, 500.0, 0.5, neox).reshape(-1)

    decode(c, [0] * 10 + [1] * 4, list(range(10)) + list(range(4)),
           k_of=lambda s, p, il: k_at(s, p, il).astype(np.float32))
    c.seq_add(0, 5, -1, 7)    # positions 5..9 -> 12..16
    c.seq_add(0, 12, -1, -2)  # and 12..16 -> 10..14: one update rotates by +5 (spec §11 case 8)
    c.seq_div(1, -1, -1, 2)   # seq 1: 0,1,2,3 -> 0,0,1,1 (llmem rotates by the real change)
    upd = c.init_update()
    assert upd.status == Status.SUCCESS
    upd.apply()
    assert not c.get_has_shift()
    for il in (0, 1):
        K = c.k(il)[0]
        if dtype == "bf16":
            K = (K.astype(np.uint32) << 16).view(np.float32)
        for p in range(10):
            want = k_at(0, p, il, shift=5 if p >= 5 else 0)
            assert np.allclose(K[p], want, atol=tol * 8, rtol=tol), (il, p)
        for p in range(4):
            want = k_at(1, p, il, shift=p // 2 - p)
            assert np.allclose(K[10 + p], want, atol=tol * 8, rtol=tol), (il, p)


def test_shift_without_rope_is_refused_and_kept():
    c = KVCache(1, 4, 4, 8)
    decode(c, [0, 0], [0, 1])
    c.seq_add(0, -1, -1, 2)
    upd = c.init_update()
    assert upd.status == Status.SUCCESS
    with pytest.raises(LlmemError, match="rope"):
        upd.apply()
    assert c.get_has_shift()


def test_pending_shift_is_saved_as_applied():
    rope = Rope(4)
    c = KVCache(1, 4, 4, 8, n_seq_max=3, dtype_k=np.float32, rope=rope)
    k0 = np.array([1.0, 0.5, -0.25, 2.0])
    decode(c, [0], [10], k_of=lambda s, p, il: rope_ref(k0, p, 4, 10000.0, 1.0, False).astype(np.float32))
    c.seq_add(0, -1, -1, 1)  # p10 -> p11, not applied yet
    blob = c.state_write(0)
    c.seq_rm(0)
    c.state_read(blob, 2)
    c.init_update().apply()
    # llama.cpp keeps the K of p10 here (spec §11 case 33); llmem saved the rotated row
    assert np.allclose(c.k(0)[0, 0], rope_ref(k0, 11, 4, 10000.0, 1.0, False), atol=1e-5)


def test_cross_stream_copy_moves_bytes_at_update():
    c = KVCache(1, 4, 4, 8, n_seq_max=2, unified=False, dtype_k=np.float32, dtype_v=np.float32)
    decode(c, [0, 0, 0], [0, 1, 2], k_of=lambda s, p, il: np.full(4, 1.0 + p, np.float32),
           v_of=lambda s, p, il: np.full(4, -1.0 - p, np.float32))
    c.seq_cp(0, 1)
    assert c.seq_pos_max(1) == 2
    assert c.k(0)[1, 2, 0] == 0.0
    blob = c.state_write(1)  # already carries stream 0's rows (llama.cpp writes zeros here)
    assert c.init_update().status == Status.SUCCESS
    c.init_update().apply()
    assert c.k(0)[1, 2].tolist() == [3.0] * 4
    d = KVCache(1, 4, 4, 8, n_seq_max=2, unified=False, dtype_k=np.float32, dtype_v=np.float32)
    d.state_read(blob, 1)
    assert d.k(0)[1, 2].tolist() == [3.0] * 4 and d.v(0)[1, :, 2].tolist() == [-3.0] * 4


# -- state bytes ----------------------------------------------------------------------------------

def test_seq_blob_layout_matches_llama_cpp():
    """The oracle's decoded example (llama.cpp b11312, state format 3): 2 layers, n_embd_k_gqa 32,
    f16, v_trans, 2 cells of seq 0."""
    c = KVCache(2, 32, 32, 256, compat="b11312")
    decode(c, [0, 0], [0, 1])
    blob = c.state_write(0)
    assert len(blob) == 608 - 8  # without the 8-byte sequence header of llama_state_seq_get_data
    assert struct.unpack_from("<II", blob, 0) == (1, 2)
    assert struct.unpack_from("<iIi iIi", blob, 8) == (0, 1, 0, 1, 1, 0)
    assert struct.unpack_from("<II", blob, 32) == (1, 2)            # v_trans, n_layer
    assert struct.unpack_from("<iQ", blob, 40) == (1, 64)          # K type f16, row 64 bytes
    assert struct.unpack_from("<iII", blob, 320) == (1, 2, 32)     # V type, element size, n_embd


def test_whole_and_seq_round_trip_into_other_ids_of_fragmented_cache():
    rng = np.random.default_rng(1)
    rows = {}

    def row(s, p, il):
        return rows.setdefault((s, p, il), rng.standard_normal(8).astype(np.float32))

    a = KVCache(2, 8, 8, 32, n_seq_max=4, dtype_k=np.float32, dtype_v=np.float32)
    decode(a, [0] * 5 + [1] * 5, list(range(5)) * 2, k_of=row, v_of=row)
    decode(a, [0] * 3, [5, 6, 7], k_of=row, v_of=row)
    a.seq_rm(1, 1, 3)  # holes at cells 6, 7
    blob = a.state_write(0)
    a.state_read(blob, 3)
    pos = a.cells()["pos"][0]
    cells3 = [i for i, s in enumerate(a.cells()["seqs"][0]) if 3 in s]
    assert cells3[:2] == [6, 7]
    for i in cells3:
        p = int(pos[i])
        assert np.array_equal(a.k(1)[0, i], row(0, p, 1))
        assert np.array_equal(a.v(0)[0, :, i], row(0, p, 0))
    whole = a.state_write(-1)
    b = KVCache(2, 8, 8, 32, n_seq_max=4, dtype_k=np.float32, dtype_v=np.float32)
    b.state_read(whole)
    assert b.state_write(-1) == whole  # compaction keeps the cell order: same bytes
    assert [b.seq_pos_min(s) for s in range(4)] == [a.seq_pos_min(s) for s in range(4)]
    assert b.state_write(3) == a.state_write(3)


def corruptions(blob):
    """(name, bytes) variants that must all be refused."""
    out = [("empty", b""), ("trailing", blob + b"\0")]
    for cut in range(0, len(blob), max(1, len(blob) // 37)):
        out.append((f"cut{cut}", blob[:cut]))
    fields = {"n_stream": 0, "cell_count": 4, "n_seq": 12, "v_trans": 4 + 4 + 12 * 3,
              "n_layer": 4 + 4 + 12 * 3 + 4, "k_type": 4 + 4 + 12 * 3 + 8,
              "k_row": 4 + 4 + 12 * 3 + 12}
    for name, off in fields.items():
        b = bytearray(blob)
        b[off] ^= 0x5A
        out.append((name, bytes(b)))
    return out


@pytest.mark.parametrize("seq", [-1, 1])
def test_every_state_error_leaves_the_cache_bit_identical(seq):
    src = KVCache(2, 4, 4, 16, n_seq_max=2, dtype_k=np.float32, dtype_v=np.float32)
    decode(src, [0, 0, 0], [0, 1, 2], k_of=lambda s, p, il: np.full(4, p, np.float32))
    blob = src.state_write(0)
    dst = KVCache(2, 4, 4, 16, n_seq_max=2, dtype_k=np.float32, dtype_v=np.float32)
    decode(dst, [0, 1, 1], [0, 0, 1], k_of=lambda s, p, il: np.full(4, 9, np.float32))
    before = snapshot(dst)
    refused = 0
    for name, bad in corruptions(blob):
        try:
            dst.state_read(bad, seq)
        except StateError:
            refused += 1
        else:
            pytest.fail(f"corruption {name} was accepted")
        assert_same(before, snapshot(dst))
    assert refused == len(corruptions(blob))
    with pytest.raises(TypeError):
        dst.state_read("not bytes", seq)


def test_state_errors_for_mismatched_caches():
    src = KVCache(2, 4, 4, 16, n_seq_max=2)
    decode(src, [0, 0], [0, 1])
    blob = src.state_write(0)
    for other in (KVCache(2, 4, 4, 16, n_seq_max=2, unified=False),  # n_stream
                  KVCache(3, 4, 4, 16, n_seq_max=2),                 # n_layer
                  KVCache(2, 4, 4, 16, n_seq_max=2, v_trans=False),  # v_trans
                  KVCache(2, 8, 4, 16, n_seq_max=2),                 # K row
                  KVCache(2, 4, 4, 16, n_seq_max=2, dtype_v=np.float32),
                  KVCache(2, 4, 4, 1, n_seq_max=2)):                 # too many cells
        before = snapshot(other)
        with pytest.raises(StateError):
            other.state_read(blob, 0)
        assert_same(before, snapshot(other))


def test_save_and_load_files(tmp_path):
    c = KVCache(1, 4, 4, 8, n_seq_max=2)
    decode(c, [1, 1], [0, 1])
    c.save(tmp_path / "kv.bin", seq_id=1)
    c.clear()
    c.load(tmp_path / "kv.bin", seq_id=0)
    assert (c.seq_pos_min(0), c.seq_pos_max(0), c.seq_pos_max(1)) == (0, 1, -1)


# -- iSWA -------------------------------------------------------------------------------------------

def make_iswa(**kw):
    args = dict(n_layer=2, n_embd_k_gqa=4, n_embd_v_gqa=4, kv_size=1024, n_seq_max=1, n_swa=8,
                is_swa_layer=[True, False], n_ubatch=64, dtype_k=np.float32, dtype_v=np.float32)
    args.update(kw)
    return KVCacheISWA(**args)


def test_iswa_sizes_and_can_shift():  # spec §11 case 37
    m = make_iswa()
    assert (m.base.size, m.swa.size) == (1024, 256)
    assert m.get_can_shift() is False
    assert make_iswa(swa_full=True).get_can_shift() is True
    assert make_iswa(n_seq_max=4).swa.size == 256
    assert make_iswa(n_seq_max=4, n_swa=100).swa.size == 512
    assert m.base.layers == [1] and m.swa.layers == [0]
    with pytest.raises(ValueError):
        make_iswa(is_swa_layer=[True])


def test_iswa_decode_routes_layers_and_reports_swa_positions():
    m = make_iswa(kv_size=256, n_swa=4, swa_full=False, n_ubatch=4)
    assert m.swa.size == 256
    batch = Batch(token=np.arange(300, dtype=np.int32))
    ctx = m.init_batch(batch, 64)
    assert ctx.status == Status.FAILED_PREPARE  # the base cache has only 256 cells
    m2 = make_iswa(kv_size=512, n_swa=4, n_ubatch=4)
    ctx = m2.init_batch(Batch(token=np.arange(300, dtype=np.int32)), 64)
    assert ctx.status == Status.SUCCESS
    for ub in ctx:
        ctx.cpy_k(0, np.ones((ub.n_tokens, 4), np.float32))
        ctx.cpy_k(1, np.full((ub.n_tokens, 4), 2.0, np.float32))
        assert ctx.swa.n_kv == 256  # the window cache has 256 cells: never more
        assert ctx.base.n_kv == (256 if m2.base.used <= 256 else 512)
    assert m2.seq_pos_max(0) == 299
    assert m2.seq_pos_min(0) == m2.swa.seq_pos_min(0) > 0
    assert m2.base.seq_pos_min(0) == 0
    assert m2.k(1)[0, 299, 0] == 2.0 and m2.k(0).shape == (1, 256, 4)
    assert m2.memory_breakdown()["CPU"] == m2.base.memory_breakdown()["CPU"] + \
        m2.swa.memory_breakdown()["CPU"]


def test_iswa_failed_swa_section_changes_neither_cache():  # spec §11 case 36
    m = make_iswa(kv_size=256, n_seq_max=2, n_ubatch=4)
    decode(m, [0, 0, 1], [0, 1, 0], k_of=lambda s, p, il: np.full(4, 1.0 + p, np.float32))
    blob = bytearray(m.state_write(0))
    base_len = len(m.base.state_write(0))
    blob[base_len + 4 + 4 + 2 * 12 + 8] ^= 0x33  # swa section's K type
    before = (snapshot(m.base), snapshot(m.swa))
    with pytest.raises(StateError):
        m.state_read(bytes(blob), 1)
    assert_same(before[0], snapshot(m.base))
    assert_same(before[1], snapshot(m.swa))
    assert m.seq_pos_max(1) == 0
    good = m.state_write(0)
    m.state_read(good, 1)
    assert (m.seq_pos_min(1), m.seq_pos_max(1), m.base.seq_pos_max(1)) == (0, 1, 1)
    part = m.state_write(0, flags=llmem.kv_cache.STATE_PARTIAL_ONLY)
    assert part == m.swa.state_write(0)


@pytest.mark.parametrize("v_trans", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_cpy_v_scattered_cells_and_streams(v_trans, dtype):
    c = KVCache(1, 4, 37, 64, n_seq_max=2, unified=False, v_trans=v_trans, dtype_v=dtype)
    decode(c, [1] * 40, list(range(40)))
    c.seq_rm(1, 3, 7)
    c.seq_rm(1, 20, 33)  # holes at cells 3..6 and 20..32 of stream 1
    n = 30
    ctx = c.init_batch(Batch(token=np.zeros(n, np.int32), seq_id=np.ones(n, np.int32)), 64)
    ctx.apply()
    cells = ctx.slot_cells().tolist()
    assert cells[:4] == [3, 4, 5, 6] and len(set(cells)) == n
    vals = np.random.default_rng(3).standard_normal((n, 37)).astype(dtype)
    ctx.cpy_v(0, vals)
    V = c.v(0)
    for t, cell in enumerate(cells):
        got = V[1, :37, cell] if v_trans else V[1, cell]
        assert np.array_equal(got, vals[t])
    assert not V[0].any()
