"""Torch storage and bookkeeping-only KV caches against numpy storage: the same K/V bytes after
every operation (rows, stream copies, K-shift), the same state bytes (formats 3 and 4, V
transposed or not, pending shifts and copies), the same restores. On CPU always (torch is in the
test venv); on CUDA too when a GPU is present."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import llmem  # noqa: E402
from llmem import Batch, KVCache, KVCacheISWA, LlmemError, Rope, Status  # noqa: E402
from llmem.storage import StateHoles, TorchStorage, rope_tables  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]
DTYPES = [("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)]
NP_BITS = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}


def host_bytes(t):
    """A torch tensor's bytes on the host (any dtype, bf16 included)."""
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def make_pair(device, name, **kw):
    kw.setdefault("rope", Rope(n_rot=4, head_dim=8, freq_base=10000.0, mode=kw.pop("mode", "normal")))
    args = (3, [16, 8, 16], [8, 8, 16], 32)
    ref = KVCache(*args, dtype_k=name, dtype_v=name, **kw)
    dt = dict(DTYPES)[name]
    tch = KVCache(*args, dtype_k=dt, dtype_v=dt, storage="torch", device=device, **kw)
    return ref, tch


def put_batch(mems, seqs, pos, rng, n_ubatch=512, as_torch=False):
    """The same batch and the same K/V rows into each memory."""
    batch = Batch(token=np.arange(len(pos), dtype=np.int32), pos=np.asarray(pos, np.int32),
                  seq_id=np.asarray(seqs, np.int32))
    ctxs = [m.init_batch(batch, n_ubatch) for m in mems]
    assert all(c.status == Status.SUCCESS for c in ctxs)
    while True:
        for c in ctxs:
            c.apply()
        n = len(ctxs[0].ubatch)
        for il in mems[0].layers:
            part = mems[0]._cache_of(il) if hasattr(mems[0], "_cache_of") else mems[0]  # iSWA: the cache of il
            k = rng.standard_normal((n, part._n_embd_k(il))).astype(np.float32)
            v = rng.standard_normal((n, part._n_embd_v(il))).astype(np.float32)
            for m, c in zip(mems, ctxs):
                if m.storage == "torch" and as_torch:  # torch rows, with grad, on the device
                    c.cpy_k(il, torch.from_numpy(k).to(m.device).requires_grad_())
                    c.cpy_v(il, torch.from_numpy(v).to(m.device))
                else:
                    c.cpy_k(il, k)
                    c.cpy_v(il, v)
        if not all(c.next() for c in ctxs):
            break


def assert_same_tensors(ref, tch):
    for il in ref.layers:
        assert ref.k(il).tobytes() == host_bytes(tch.k(il)), f"K of layer {il}"
        assert ref.v(il).tobytes() == host_bytes(tch.v(il)), f"V of layer {il}"
    assert np.array_equal(ref.cells()["pos"], tch.cells()["pos"])


def update(*mems):
    for m in mems:
        u = m.init_update()
        if u.status == Status.SUCCESS:
            u.apply()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [d[0] for d in DTYPES])
@pytest.mark.parametrize("v_trans", [True, False])
@pytest.mark.parametrize("mode", ["normal", "neox"])
def test_rows_shift_and_copies_match_numpy(device, name, v_trans, mode):
    rng = np.random.default_rng(1)
    ref, tch = make_pair(device, name, v_trans=v_trans, mode=mode, n_seq_max=3, unified=False)
    put_batch([ref, tch], [0] * 5 + [1] * 3, list(range(5)) + list(range(3)), rng, as_torch=True)
    assert_same_tensors(ref, tch)
    for step in range(3):
        put_batch([ref, tch], [0, 1], [5 + step, 3 + step], rng)
    for m in (ref, tch):
        m.seq_cp(0, 2)            # across streams: a pending whole-stream copy
        m.seq_rm(1, 1, 3)
        m.seq_add(0, 2, -1, -2)   # a K-shift of part of sequence 0
        m.seq_add(2, 0, -1, 7)
    assert tch.pending_update().copies == ((0, 2),)
    update(ref, tch)
    assert_same_tensors(ref, tch)
    put_batch([ref, tch], [2, 0], [ref.seq_pos_max(2) + 1, ref.seq_pos_max(0) + 1], rng)
    assert_same_tensors(ref, tch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [d[0] for d in DTYPES])
@pytest.mark.parametrize("v_trans", [True, False])
@pytest.mark.parametrize("fmt", [3, 4])
def test_state_bytes_match_numpy(device, name, v_trans, fmt):
    rng = np.random.default_rng(2)
    ref, tch = make_pair(device, name, v_trans=v_trans, state_format=fmt, n_seq_max=3, unified=False)
    put_batch([ref, tch], [0] * 6 + [1] * 4 + [2] * 2, list(range(6)) + list(range(4)) + [0, 1], rng)
    for m in (ref, tch):
        m.seq_add(0, 3, -1, 5)    # pending shift: written as if applied
        m.seq_cp(1, 2)            # pending stream copy: stream 2's bytes are stream 1's
    for seq in (-1, 0, 1, 2):
        assert ref.state_write(seq) == tch.state_write(seq), seq
    assert ref.state_write(-1, llmem.STATE_HEADER) == tch.state_write(-1, llmem.STATE_HEADER)
    buf = bytearray(tch.state_size(0) + 10)
    n = tch.state_write_into(buf, 0)
    assert bytes(buf[:n]) == ref.state_write(0)
    update(ref, tch)
    assert ref.state_write() == tch.state_write()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["f32", "bf16"])
@pytest.mark.parametrize("v_trans", [True, False])
def test_state_read_matches_numpy(device, name, v_trans):
    rng = np.random.default_rng(3)
    src, _ = make_pair(device, name, v_trans=v_trans, n_seq_max=2, unified=False)
    put_batch([src], [0] * 5 + [1] * 3, list(range(5)) + list(range(3)), rng)
    whole, one = src.state_write(), src.state_write(1)
    ref, tch = make_pair(device, name, v_trans=v_trans, n_seq_max=2, unified=False)
    put_batch([ref, tch], [0] * 2, [0, 1], rng)
    for m in (ref, tch):
        m.state_read(one, 1)
    assert_same_tensors(ref, tch)
    for m in (ref, tch):
        m.state_read(whole)
    assert_same_tensors(ref, tch)
    assert tch.state_write() == whole
    # a refused read changes nothing
    before = [host_bytes(tch.k(il)) for il in tch.layers]
    with pytest.raises(llmem.StateError):
        tch.state_read(whole[:-3])
    assert before == [host_bytes(tch.k(il)) for il in tch.layers]


@pytest.mark.parametrize("device", DEVICES)
def test_unified_cache_and_header_roundtrip(device):
    rng = np.random.default_rng(4)
    ref, tch = make_pair(device, "f16", n_seq_max=4)
    put_batch([ref, tch], [0, 0, 1, 2, 3, 3], [0, 1, 0, 0, 0, 1], rng, n_ubatch=2)
    for m in (ref, tch):
        m.seq_cp(0, 2, -1, -1)
        m.seq_div(3, 0, -1, 2)
    update(ref, tch)
    assert_same_tensors(ref, tch)
    data = tch.state_write(2, llmem.STATE_HEADER)
    assert data == ref.state_write(2, llmem.STATE_HEADER)
    for m in (ref, tch):
        m.seq_rm(2)
        m.state_read(data, 2, llmem.STATE_HEADER)
    assert_same_tensors(ref, tch)


@pytest.mark.parametrize("device", DEVICES)
def test_k_shift_f32_is_the_core_kshift_bit_for_bit_with_yarn(device):
    rope = Rope(n_rot=8, head_dim=8, freq_base=500000.0, freq_scale=0.25, ext_factor=1.0, attn_factor=1.0,
                n_ctx_orig=4096, mode="neox")
    rng = np.random.default_rng(5)
    ref, tch = make_pair(device, "f32", rope=rope)
    put_batch([ref, tch], [0] * 9, list(range(9)), rng)
    for m in (ref, tch):
        m.seq_add(0, 0, -1, 1000)
    update(ref, tch)
    assert_same_tensors(ref, tch)
    for m in (ref, tch):  # a pending shift of part of the cells, saved as if applied (YaRN scales)
        m.seq_add(0, 4, -1, -3)
    assert ref.state_write() == tch.state_write()
    cs, sn = rope_tables(rope, 1000)
    assert cs.dtype == np.float32 and cs.shape == (4,)


@pytest.mark.parametrize("device", DEVICES)
def test_device_indices_inputs_and_views(device):
    rng = np.random.default_rng(6)
    _, tch = make_pair(device, "bf16", n_seq_max=2)
    assert tch.storage == "torch" and tch.device.type == device
    assert tch.k(0).device.type == device and tch.k(0).dtype == torch.bfloat16
    ctx = tch.decode_step([0, 1])
    idx = ctx.k_idxs(device=device)
    assert isinstance(idx, torch.Tensor) and idx.device.type == device
    assert idx.cpu().tolist() == ctx.k_idxs().tolist()
    assert ctx.k_idxs(device=device) is idx  # cached per micro-batch
    rows = torch.ones(2, 16, dtype=torch.float16, device=device, requires_grad=False)
    ctx.cpy_k(0, rows.reshape(2, 2, 8))
    ctx.cpy_v(0, torch.full((2, 8), 2.0, device=device, requires_grad=True))
    k = ctx.get_k(0)
    assert isinstance(k, torch.Tensor) and k.shape == (1, ctx.n_kv, 16)
    assert ctx.get_k_float(0).dtype == torch.float32 and float(ctx.get_k_float(0).sum()) == 32.0
    assert float(ctx.get_v_float(0)[0, :8].sum()) == 32.0
    with pytest.raises(ValueError, match="n_tokens=2"):
        ctx.cpy_k(0, torch.ones(3, 16))
    with pytest.raises(TypeError, match="floats"):
        ctx.cpy_k(0, torch.ones(2, 16, dtype=torch.int32))
    assert list(tch.memory_breakdown().values())[0] == sum(
        t.numel() * 2 for il in tch.layers for t in (tch.k(il), tch.v(il)))


@pytest.mark.parametrize("device", DEVICES)
def test_caller_buffers(device):
    k0 = torch.zeros(1, 32, 16, dtype=torch.float16, device=device)
    v0 = torch.zeros(1, 16, 32, dtype=torch.float16, device=device)
    c = KVCache(3, [16, 8, 16], [8, 8, 16], 32, storage=TorchStorage(device=device, buffers={0: (k0, v0)}))
    assert c.k(0) is k0 and c.v(0) is v0 and c.k(1).shape == (1, 32, 8)
    ctx = c.decode_step([0])
    ctx.cpy_k(0, np.ones((1, 16), np.float32))
    assert float(k0.float().sum()) == 16.0
    with pytest.raises(ValueError, match="shape"):
        KVCache(3, [16, 8, 16], [8, 8, 16], 32, storage=TorchStorage(buffers={0: (k0[:, :8], v0)}))
    with pytest.raises(ValueError, match="does not store"):
        KVCache(3, 16, 16, 32, layer_filter=lambda il: il == 1, storage=TorchStorage(buffers={0: (k0, v0)}))


def test_arguments():
    with pytest.raises(TypeError, match="quantized"):
        KVCache(1, 32, 32, 16, dtype_k="q8_0", storage="torch", device="cpu")
    with pytest.raises(ValueError, match="storage"):
        KVCache(1, 8, 8, 16, storage="cupy")
    with pytest.raises(ValueError, match="device"):
        KVCache(1, 8, 8, 16, device="cpu")
    with pytest.raises(ValueError, match="device"):
        KVCache(1, 8, 8, 16, storage=None, device="cpu")
    c = KVCache(1, 8, 8, 16, storage="torch", device="cpu")
    ctx = c.decode_step([0])
    with pytest.raises(ValueError, match="tensors are on"):
        ctx.k_idxs(device="meta")
    n = KVCache(1, 8, 8, 16)
    with pytest.raises(TypeError, match="torch storage"):
        n.decode_step([0]).k_idxs(device="cpu")


# -- bookkeeping-only ---------------------------------------------------------------------------

def fill_holes(w: StateHoles, src: KVCache) -> bytes:
    """What an engine does with state_write_holes: copy its tensors' rows into the sections (here
    the tensors are a numpy cache's, which ran the same operations)."""
    out = bytearray(w.data)
    for h in w.holes:
        if h.kind == "k":
            rows = src.k(h.layer)[h.stream][h.cells]
            assert h.shift is None
        elif h.kind == "v":
            rows = src.v(h.layer)[h.stream][h.cells]
        else:
            rows = src.v(h.layer)[h.stream, :h.n_cols][:, h.cells]
        b = np.ascontiguousarray(rows).tobytes()
        assert len(b) == h.nbytes
        out[h.offset:h.offset + h.nbytes] = b
    return bytes(out)


@pytest.mark.parametrize("v_trans", [True, False])
def test_bookkeeping_only_cache(v_trans):
    rng = np.random.default_rng(7)
    kw = dict(rope=Rope(n_rot=4, head_dim=8), n_seq_max=3, unified=False, v_trans=v_trans)
    # a quantized K where V is not transposed: the contract holds for block types too
    ek, dt_k = ([16, 8, 16], "f16") if v_trans else ([32, 32, 64], "q8_0")
    ref = KVCache(3, ek, [8, 8, 16], 32, dtype_k=dt_k, **kw)
    bk = KVCache(3, ek, [8, 8, 16], 32, dtype_k=dt_k, storage=None, **kw)
    assert bk.storage == "none" and bk.memory_breakdown() == {}
    with pytest.raises(LlmemError, match="bookkeeping-only"):
        bk.k(0)
    put_batch([ref], [0] * 4 + [1] * 2, [0, 1, 2, 3, 0, 1], rng)
    ctx = bk.init_batch(Batch(token=np.arange(6, dtype=np.int32), pos=np.array([0, 1, 2, 3, 0, 1], np.int32),
                              seq_id=np.array([0] * 4 + [1] * 2, np.int32)), 512)
    ctx.apply()
    first = ctx.k_idxs().copy()
    with pytest.raises(LlmemError, match="bookkeeping-only"):
        ctx.cpy_k(0, np.zeros((len(first), ek[0]), np.float32))
    ctx.next()
    ctx.apply()
    assert bk.cells()["pos"].tolist() == ref.cells()["pos"].tolist()
    with pytest.raises(LlmemError, match="state_write_holes"):
        bk.state_write()
    for seq in (-1, 0, 1):
        assert fill_holes(bk.state_write_holes(seq), ref) == ref.state_write(seq)
    # the update as data: copies, then K-shift; apply() refuses until they were taken
    for m in (ref, bk):
        m.seq_cp(1, 2)
        m.seq_add(0, 1, -1, 3)
    u = bk.init_update()
    with pytest.raises(LlmemError, match="ops"):
        u.apply()
    (ops,) = u.ops()
    assert ops.copies == ((1, 2),)
    (sh,) = ops.k_shift
    assert sh.stream == 0 and sh.cells.tolist() == [1, 2, 3] and sh.deltas.tolist() == [3, 3, 3]
    u.apply()
    assert not bk.get_has_shift() and bk.pending_update().copies == ()
    # restore through the caller's tensors: the sections of the bytes and where they go
    data = ref.state_write(0)
    bk.seq_rm(0)
    r = bk.state_read_holes(data, 0)
    assert {h.kind for h in r.holes} == ({"k", "v_trans"} if v_trans else {"k", "v"})
    assert all(len(h.cells) == 4 for h in r.holes) and not r.clear_first


@pytest.mark.parametrize("device", DEVICES)
def test_iswa_torch_matches_numpy(device):
    rng = np.random.default_rng(8)
    kw = dict(n_swa=4, is_swa_layer=[True, False, True], n_seq_max=2, rope=Rope(n_rot=4, head_dim=8),
              n_ubatch=8)
    ref = KVCacheISWA(3, 16, 16, 64, dtype_k=np.float32, dtype_v=np.float32, **kw)
    tch = KVCacheISWA(3, 16, 16, 64, dtype_k=torch.float32, dtype_v=torch.float32, storage="torch",
                      device=device, **kw)
    for p in range(0, 12, 3):
        put_batch([ref, tch], [0, 0, 0, 1], [p, p + 1, p + 2, p // 3], rng, n_ubatch=8)
    for m in (ref, tch):
        m.seq_add(1, 0, -1, 2)
    update(ref, tch)
    for part in ("base", "swa"):
        assert_same_tensors(getattr(ref, part), getattr(tch, part))
    for seq in (-1, 0):
        assert ref.state_write(seq) == tch.state_write(seq)
    data = ref.state_write()
    tch2 = KVCacheISWA(3, 16, 16, 64, dtype_k="f32", dtype_v="f32", storage="torch", device=device, **kw)
    tch2.state_read(data)
    assert tch2.state_write() == data
    buf = bytearray(len(data))
    assert tch2.state_write_into(buf) == len(data) and bytes(buf) == data


def _mask_batches(mem, rng):
    """A prefill of two sequences, then mixed decode steps: micro-batches to ask masks of."""
    for seqs, pos in (([0, 0, 0, 0, 0, 1, 1, 1], [0, 1, 2, 3, 4, 0, 1, 2]), ([0, 1, 1], [5, 3, 4]), ([1, 0], [5, 6])):
        batch = Batch(token=np.arange(len(pos), dtype=np.int32), pos=np.asarray(pos, np.int32),
                      seq_id=np.asarray(seqs, np.int32))
        ctx = mem.init_batch(batch, 4)
        assert ctx.status == Status.SUCCESS
        while True:
            ctx.apply()
            yield ctx
            if not ctx.next():
                break


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unified", [True, False])
@pytest.mark.parametrize("swa", [0, 3])
def test_masks_and_paged_tables_on_the_device(device, unified, swa):
    """kq_mask(device=) / paged_kv(device=): torch tensors on the storage's device equal to the
    host forms, for causal and not, f32 and f16, padded rows, sliding windows, unified or one
    stream per sequence; cached per micro-batch and arguments."""
    rng = np.random.default_rng(31)
    kw = dict(n_seq_max=2, unified=unified, rope=Rope(n_rot=4, head_dim=8))
    if swa:
        kw.update(n_swa=swa, swa_type=llmem.SWAType.STANDARD)
    mem = KVCache(2, 8, 8, 32, dtype_k=torch.float32, dtype_v=torch.float32, storage="torch", device=device, **kw)
    seen = 0
    for ctx in _mask_batches(mem, rng):
        for causal in (True, False):
            for dtype, tdtype in ((np.float32, torch.float32), (np.float16, torch.float16)):
                for pad in (1, 4):
                    want = ctx.kq_mask(causal, dtype=dtype, pad=pad)
                    got = ctx.kq_mask(causal, dtype=dtype, pad=pad, device=device)
                    assert isinstance(got, torch.Tensor) and got.device.type == device and got.dtype == tdtype
                    assert tuple(got.shape) == want.shape
                    assert got.cpu().numpy().tobytes() == want.tobytes(), (causal, dtype, pad)
                    assert ctx.kq_mask(causal, dtype=dtype, pad=pad, device=device) is got
            host = ctx.paged_kv(causal)
            dev = ctx.paged_kv(causal, device=device)
            for name, a, t in zip(host._fields, host, dev):
                assert t.device.type == device and t.dtype == torch.int32, name
                assert t.cpu().tolist() == a.tolist(), name
        seen += 1
    assert seen >= 4


@pytest.mark.parametrize("device", DEVICES)
def test_iswa_and_hybrid_masks_on_the_device(device):
    kw = dict(n_swa=3, is_swa_layer=[True, False, True], n_seq_max=2, rope=Rope(n_rot=4, head_dim=8), n_ubatch=4)
    iswa = KVCacheISWA(3, 8, 8, 32, dtype_k=torch.float32, dtype_v=torch.float32, storage="torch",
                       device=device, **kw)
    rng = np.random.default_rng(32)
    for ctx in _mask_batches(iswa, rng):
        for il in range(3):
            want = ctx.kq_mask(il, dtype=np.float16, pad=2)
            got = ctx.kq_mask(il, dtype=np.float16, pad=2, device=device)
            assert got.cpu().numpy().tobytes() == want.tobytes(), il
            assert [t.cpu().tolist() for t in ctx.paged_kv(il, device=device)] == [a.tolist() for a in ctx.paged_kv(il)]
    attn = KVCache(3, 8, 8, 32, n_seq_max=2, dtype_k=torch.float32, dtype_v=torch.float32,
                   layer_filter=lambda il: il == 1, storage="torch", device=device)
    recr = llmem.RecurrentMemory(3, 4, 4, mem_size=2, n_seq_max=2, layer_filter=lambda il: il != 1,
                                 storage="torch", device=device)
    hyb = llmem.HybridMemory(attn, recr)
    ctx = hyb.init_batch(Batch(token=np.zeros(3, np.int32), seq_id=np.array([0, 0, 1], np.int32)), 8)
    ctx.apply()
    assert ctx.attn.kq_mask(device=device).cpu().numpy().tobytes() == ctx.attn.kq_mask().tobytes()


def test_device_masks_refused():
    mem = KVCache(1, 8, 8, 16, storage="torch", device="cpu")
    ctx = mem.decode_step([0])
    with pytest.raises(ValueError, match="meta"):
        ctx.kq_mask(device="meta")
    with pytest.raises(ValueError, match="not a torch device"):
        ctx.kq_mask(device="gpu7")
    with pytest.raises(ValueError, match="meta"):
        ctx.paged_kv(device="meta")
    with pytest.raises(ValueError, match="not both"):
        ctx.kq_mask(out=np.empty((1, ctx.n_kv), np.float32), device="cpu")
    full = mem.init_full()
    with pytest.raises(LlmemError):
        full.kq_mask(device="cpu")  # no micro-batch: the host form's error
    for storage in ("numpy", None):
        ctx = KVCache(1, 8, 8, 16, storage=storage).decode_step([0])
        with pytest.raises(TypeError, match="torch storage"):
            ctx.kq_mask(device="cpu")
        with pytest.raises(TypeError, match="torch storage"):
            ctx.paged_kv(device="cpu")
        assert ctx.kq_mask().shape == (1, ctx.n_kv)  # the host forms are unchanged
