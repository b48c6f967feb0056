"""Torch storage and bookkeeping-only recurrent memories and hybrids against numpy storage: the
same input states, the same arrays after every store (rollback planes, copy-on-write moves), the
same state bytes and restores. CPU always; CUDA too when present."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import llmem  # noqa: E402
from llmem import HybridMemory, KVCache, LlmemError, RecurrentMemory, Rope, Status  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]
PRESENT = [0, 2]  # layer 1 has no state (layer_filter)


def host(t):
    return t.detach().cpu().contiguous().numpy()


def batch(entries):
    seq_id = [[e[0]] for e in entries]
    return llmem.Batch(token=np.zeros(len(entries), np.int32), pos=np.array([e[1] for e in entries], np.int32),
                       seq_id=seq_id)


def make(device, dtype, storage="torch", **kw):
    args = dict(n_layer=3, n_embd_r=[3, 5, 4], n_embd_s=[6, 2, 8], mem_size=6, n_seq_max=4, n_rs_seq=2,
                layer_filter=lambda il: il != 1)
    args.update(kw)
    ref = RecurrentMemory(**args, dtype_r=dtype, dtype_s=dtype)
    tch = RecurrentMemory(**args, dtype_r=dtype, dtype_s=dtype, storage=storage, device=device)
    return ref, tch


def step(mems, entries, rng, planes=1):
    """One batch into every memory in lockstep: the input states must agree; the same new states
    (``planes`` rollback planes) go back."""
    ctxs = [m.init_batch(batch(entries), 512) for m in mems]
    assert all(c.status == Status.SUCCESS for c in ctxs)
    for _ in zip(*[iter(c) for c in ctxs]):
        for il in PRESENT:
            for kind in ("r", "s"):
                ins = [getattr(c, "get_" + kind)(il) for c in ctxs]
                ref_in = ins[0]
                for x in ins[1:]:
                    assert np.array_equal(host(x), ref_in), (il, kind)
                n, w = ref_in.shape
                new = rng.standard_normal((planes, n, w)).astype(ref_in.dtype)
                for m, c in zip(mems, ctxs):
                    val = new if planes > 1 else new[0]
                    if m.storage == "torch":
                        val = torch.from_numpy(np.ascontiguousarray(val)).to(m.device).requires_grad_(
                            val.dtype == np.float32)
                    getattr(c, "store_" + kind)(il, val)


def same_arrays(ref, tch):
    for il in PRESENT:
        assert ref.r(il).tobytes() == host(tch.r(il)).tobytes(), f"r of layer {il}"
        assert ref.s(il).tobytes() == host(tch.s(il)).tobytes(), f"s of layer {il}"
    assert ref.cells()["tail"].tolist() == tch.cells()["tail"].tolist()


def scenario(ref, tch, rng):
    step([ref, tch], [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)], rng)
    for p in range(3):
        step([ref, tch], [(0, 3 + p), (1, 2 + p)], rng, planes=3)
    for m in (ref, tch):
        m.seq_cp(0, 2)           # shared cell: copied on the next write
    step([ref, tch], [(2, 6), (0, 6), (3, 0)], rng, planes=2)
    for m in (ref, tch):
        assert m.seq_rm(1, 4, -1)  # rollback by one token: a snapshot plane
    step([ref, tch], [(1, 4)], rng)
    same_arrays(ref, tch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_recurrent_torch_matches_numpy(device, dtype):
    rng = np.random.default_rng(11)
    ref, tch = make(device, dtype)
    assert tch.storage == "torch" and tch.r(0).device.type == device
    scenario(ref, tch, rng)
    for seq in (-1, 0, 1, 2, 3):
        assert ref.state_write(seq) == tch.state_write(seq), seq
    assert ref.state_write(-1, llmem.STATE_HEADER) == tch.state_write(-1, llmem.STATE_HEADER)
    whole, one = ref.state_write(), ref.state_write(2)
    ref2, tch2 = make(device, dtype)
    for m in (ref2, tch2):
        m.state_read(whole)
    same_arrays(ref2, tch2)
    for m in (ref2, tch2):
        m.seq_rm(2)
        m.state_read(one, 2)
    same_arrays(ref2, tch2)
    with pytest.raises(llmem.StateError):
        tch2.state_read(whole[:-2])
    same_arrays(ref2, tch2)
    tch2.clear()
    assert float(tch2.s(0).abs().sum()) == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_recurrent_torch_checkpoints_match_numpy(device, dtype):
    """Checkpoints of a torch-storage memory: the pool's bookkeeping is the core's, the rows stay
    torch tensors on the device; saves, restores (also of a pending rollback's snapshot) and
    drops leave exactly numpy storage's arrays and state bytes."""
    rng = np.random.default_rng(21)
    ref, tch = make(device, dtype)
    scenario(ref, tch, rng)
    for m in (ref, tch):
        assert m.seq_rm(0, 6, -1)  # a pending rollback: the checkpoint takes the snapshot it selects
    ids = {}
    for seq in (0, 1, 3):
        a, b = ref.checkpoint_save(seq), tch.checkpoint_save(seq)
        assert a == b and ref.checkpoint_pos(a) == tch.checkpoint_pos(b)
        ids[seq] = a
    assert ref.checkpoint_stats() == tch.checkpoint_stats()
    assert all(t.device.type == device for rows in tch._tstore._ckpt.values() for t in rows)
    state = {seq: ref.state_write(seq) for seq in ids}
    step([ref, tch], [(1, 5), (3, 1)], rng)  # the sequences move on; the checkpoints stay
    for m in (ref, tch):
        m.seq_rm(0)
        m.seq_rm(1)
    for seq_from, seq_to in ((0, 1), (1, 0)):
        assert ref.checkpoint_restore(ids[seq_from], seq_to) == tch.checkpoint_restore(ids[seq_from], seq_to)
        assert tch.state_write(seq_to) == ref.state_write(seq_to)
    same_arrays(ref, tch)
    # what a restore placed equals what the numpy memory saved, byte for byte
    assert tch.state_write(1) == state[0]
    # refusals leave both the pool and the device rows as they were
    with pytest.raises(ValueError):
        tch.checkpoint_restore(ids[3], 3)  # 3 holds a state
    with pytest.raises(ValueError):
        tch.checkpoint_restore(12345, 2)
    for m in (ref, tch):
        m.set_checkpoint_limits(max_count=3)
    with pytest.raises(LlmemError, match="full"):
        tch.checkpoint_save(2)
    assert len(tch._tstore._ckpt) == 3 and tch.checkpoint_stats()["count"] == 3
    assert ref.checkpoint_drop(ids[3]) and tch.checkpoint_drop(ids[3]) and not tch.checkpoint_drop(ids[3])
    assert len(tch._tstore._ckpt) == 2
    step([ref, tch], [(2, 7)], rng)
    a, b = ref.checkpoint_save(2), tch.checkpoint_save(2)
    assert a == b
    for m in (ref, tch):
        m.seq_rm(2)
        m.checkpoint_restore(a, 2)
    same_arrays(ref, tch)
    tch.checkpoint_clear()
    assert not tch._tstore._ckpt and tch.checkpoint_stats()["count"] == 0


def test_recurrent_bookkeeping_only_checkpoints():
    """storage=None: the pool keeps ids, positions and limits; the engine copies the rows of
    state_row(seq) out after a save and into it after a restore (checked here on a copy of a
    numpy memory's arrays run in lockstep)."""
    rng = np.random.default_rng(22)
    ref, bk = make(None, np.float32, storage=None)
    step([ref], [(0, 0), (0, 1), (1, 0)], rng, planes=2)
    ctx = bk.init_batch(batch([(0, 0), (0, 1), (1, 0)]), 512)
    for _ in ctx:
        pass
    for m in (ref, bk):
        assert m.seq_rm(0, 1, -1)  # pending rollback: the row is in a snapshot plane
    assert bk.state_row(0) == ref.state_row(0) >= ref.size and bk.state_row(3) == -1
    engine = {il: (ref.r(il).copy(), ref.s(il).copy()) for il in PRESENT}
    cid = bk.checkpoint_save(0)
    assert cid == ref.checkpoint_save(0)
    row = bk.state_row(0)
    saved = {il: (r[row].copy(), s[row].copy()) for il, (r, s) in engine.items()}
    assert bk.checkpoint_stats() == ref.checkpoint_stats()
    for m in (ref, bk):
        m.seq_rm(0)
        m.seq_rm(1)
    assert bk.checkpoint_restore(cid, 1) == ref.checkpoint_restore(cid, 1)
    row = bk.state_row(1)
    for il, (r, s) in engine.items():
        r[row], s[row] = saved[il]
        assert r[row].tobytes() == ref.r(il)[row].tobytes() and s[row].tobytes() == ref.s(il)[row].tobytes()
    assert bk.cells()["tail"].tolist() == ref.cells()["tail"].tolist()
    with pytest.raises(ValueError):
        bk.checkpoint_restore(cid, 1)  # holds a state now


def test_recurrent_bookkeeping_only():
    rng = np.random.default_rng(12)
    ref, bk = make(None, np.float32, storage=None)
    assert bk.storage == "none" and bk.memory_breakdown() == {"r": 0, "s": 0}
    with pytest.raises(LlmemError, match="bookkeeping-only"):
        bk.r(0)
    step([ref], [(0, 0), (0, 1), (1, 0)], rng)
    ctx = bk.init_batch(batch([(0, 0), (0, 1), (1, 0)]), 512)
    for _ in ctx:
        assert ctx.s_copy_all().size  # the row moves are the caller's: s_copy, rs_z, head
    assert bk.cells()["tail"].tolist() == ref.cells()["tail"].tolist()
    with pytest.raises(LlmemError, match="state_write_holes"):
        bk.state_write()
    w = bk.state_write_holes(-1)
    out = bytearray(w.data)
    for h in w.holes:
        rows = (ref.r if h.kind == "r" else ref.s)(h.layer)[h.cells]
        out[h.offset:h.offset + h.nbytes] = rows.tobytes()
    assert bytes(out) == ref.state_write()
    r = bk.state_read_holes(bytes(out))
    assert {h.kind for h in r.holes} == {"r", "s"} and r.clear_first


@pytest.mark.parametrize("device", DEVICES)
def test_hybrid_with_torch_parts(device):
    rng = np.random.default_rng(13)

    def build(storage, dev):
        attn = KVCache(3, 8, 8, 32, n_seq_max=4, dtype_k=np.float32, dtype_v=np.float32,
                       layer_filter=lambda il: il == 1, rope=Rope(n_rot=4, head_dim=8), storage=storage, device=dev)
        recr = RecurrentMemory(3, [3, 5, 4], [6, 2, 8], mem_size=6, n_seq_max=4, n_rs_seq=2,
                               layer_filter=lambda il: il != 1, storage=storage, device=dev)
        return HybridMemory(attn, recr)
    ref, tch = build("numpy", None), build("torch", device)
    for entries in ([(0, 0), (0, 1), (1, 0)], [(0, 2), (1, 1)]):
        ctxs = [m.init_batch(batch(entries), 512) for m in (ref, tch)]
        for _ in zip(*[iter(c) for c in ctxs]):
            n = len(ctxs[0].ubatch)
            k = rng.standard_normal((n, 8)).astype(np.float32)
            for m, c in zip((ref, tch), ctxs):
                c.attn.cpy_k(1, k)
                c.attn.cpy_v(1, k)
            for il in PRESENT:
                ins = [c.recr.get_s(il) for c in ctxs]
                assert np.array_equal(host(ins[1]), ins[0])
                new = rng.standard_normal(ins[0].shape).astype(np.float32)
                ctxs[0].recr.store_s(il, new)
                ctxs[1].recr.store_s(il, torch.from_numpy(new).to(device))
    for seq in (-1, 0, 1):
        assert ref.state_write(seq) == tch.state_write(seq)
    data = ref.state_write()
    ref2, tch2 = build("numpy", None), build("torch", device)
    for m in (ref2, tch2):
        m.state_read(data)
    assert tch2.state_write() == data
    for m in (ref2, tch2):
        m.seq_rm(1)
        m.state_read(ref.state_write(1), 1)
    assert tch2.state_write() == ref2.state_write()
