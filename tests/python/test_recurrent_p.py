"""The recurrent memory's third per-layer array, P (llama.cpp's ``p_l``, "cache_ple_r_l": the conv
history of a per-layer-embedding module, b11312 and b11549 alike): sizes, the state bytes against a
slow reference written here from the format description, round trips (also inside hybrids, state
formats 3 and 4), every row copy (s_copy, the slot's other cells, rollback planes, checkpoints),
plan/from_hparams, bad arguments, and toy models whose P-using layers decode through the memory
exactly as they compute from scratch."""

from __future__ import annotations

import struct
from typing import Any, Optional

import numpy as np
import pytest

import llmem
from llmem import HybridMemory, KVCache, RecurrentMemory, StateError, Status
from llmem.hparams import ModelHParams
from llmem.plan import plan_memory
from llmem.toy import ToyHybrid, ToyRecurrent
from llmem.toy import layers as L
from toy_session import Session, parallel_sequences, prefix_sharing, prompt_then_tokens, random_tokens, state_round_trip


def make_batch(entries):
    seq_id = [[e[0]] if isinstance(e[0], int) else list(e[0]) for e in entries]
    pos = np.array([e[1] for e in entries], dtype=np.int32)
    return llmem.Batch(token=np.zeros(len(entries), np.int32), pos=pos, seq_id=seq_id)


def run(mem, seq, p0, p1, value=None, planes=1):
    """Decode ``seq`` at [p0, p1) storing distinct constants in every present array (r: v, s: -v,
    p: 1000 + v; plane d of each: that minus d/8)."""
    ctx = mem.init_batch(make_batch([(seq, p) for p in range(p0, p1)]), 512)
    assert ctx.status == Status.SUCCESS
    for _ in ctx:
        for il in range(mem.n_layer):
            if not mem.has_layer(il):
                continue
            v = float(seq + p1 if value is None else value) + 0.25 * il

            def new(a, base):
                k = min(planes, mem.n_rs_seq + 1)
                out = np.stack([np.full_like(a, base - d / 8) for d in range(k)])
                return out if k > 1 else out[0]

            ctx.store_r(il, new(ctx.get_r(il), v))
            ctx.store_s(il, new(ctx.get_s(il), -v))
            if mem.has_p(il):
                ctx.store_p(il, new(ctx.get_p(il), 1000 + v))


def mem3(**kw) -> RecurrentMemory:
    """4 model layers: 0, 1 and 3 recurrent; P on layers 1 (width 6) and 3 (width 2)."""
    args: dict[str, Any] = dict(n_layer=4, n_embd_r=3, n_embd_s=2, mem_size=4, n_seq_max=4,
                                layer_filter=[True, True, False, True], n_embd_p=[0, 6, 5, 2])
    args.update(kw)
    return RecurrentMemory(**args)


# -- the slow reference of the state bytes (llama.cpp's state_write_data, from its description) ---

_TYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}


def ref_state_bytes(mem: RecurrentMemory, seq: int) -> bytes:
    """The recurrent block as the format describes it: u32 cell count; per cell i32 pos and u32
    id count (+ the ids, whole-memory writes only); u32 s_trans (0), u32 n_layer; for each present
    layer i32 type_r, u64 r row bytes, the r rows, then where the layer has P a u64 P row size and
    the P rows; then for each present layer i32 type_s, u64 s row bytes, the s rows. A cell's row
    is plane * size + (src if src >= 0 else cell), plane being its sequences' pending rollback."""
    c = mem.cells()
    rs_idx = mem.rs_idx()
    if seq == -1:
        chosen = [i for i in range(mem.size) if c["seq_ids"][i]]
    else:
        t = int(c["tail"][seq]) if seq < mem.size else -1
        chosen = [t] if t >= 0 else []
    out = bytearray(struct.pack("<I", len(chosen)))
    rows = []
    for i in chosen:
        ids = c["seq_ids"][i]
        out += struct.pack("<iI", int(c["pos"][i]), len(ids) if seq == -1 else 0)
        if seq == -1:
            out += struct.pack(f"<{len(ids)}i", *ids)
        plane = int(rs_idx[seq if seq != -1 else ids[0]])
        src = int(c["src"][i])
        rows.append(plane * mem.size + (src if src >= 0 else i))
    out += struct.pack("<II", 0, mem.n_layer)
    present = [il for il in range(mem.n_layer) if mem.has_layer(il)]
    for il in present:
        r = mem.r(il)
        out += struct.pack("<iq", _TYPE_IDS[r.dtype], r.shape[1] * r.itemsize)
        out += b"".join(r[k].tobytes() for k in rows)
        if mem.has_p(il):
            p = mem.p(il)
            out += struct.pack("<q", p.shape[1] * p.itemsize)
            out += b"".join(p[k].tobytes() for k in rows)
    for il in present:
        s = mem.s(il)
        out += struct.pack("<iq", _TYPE_IDS[s.dtype], s.shape[1] * s.itemsize)
        out += b"".join(s[k].tobytes() for k in rows)
    return bytes(out)


def test_arrays_sizes_and_breakdown():
    mem = mem3(n_rs_seq=2)
    rows = 4 * 3
    assert [mem.has_p(il) for il in range(4)] == [False, True, False, True]
    assert mem.p(1).shape == (rows, 6) and mem.p(3).shape == (rows, 2)
    assert mem.p(1).dtype == mem.dtype_r
    assert mem.memory_breakdown() == {"r": 3 * rows * 3 * 4, "s": 3 * rows * 2 * 4, "p": rows * 8 * 4}
    # no P anywhere: the breakdown is as before
    assert set(RecurrentMemory(2, 3, 2, mem_size=2).memory_breakdown()) == {"r", "s"}
    # one int for every layer, a callable
    assert RecurrentMemory(2, 3, 2, mem_size=2, n_embd_p=4).p(1).shape == (2, 4)
    by_fn = RecurrentMemory(3, 3, 2, mem_size=2, n_embd_p=lambda il: 2 * il)
    assert [by_fn.has_p(il) for il in range(3)] == [False, True, True] and by_fn.p(2).shape == (2, 4)
    f16 = mem3(dtype_r=np.float16, dtype_s=np.float32)
    assert f16.p(1).dtype == np.float16


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n_rs_seq", [0, 2])
def test_state_bytes_match_the_reference(dtype, n_rs_seq):
    mem = mem3(dtype_r=dtype, dtype_s=dtype, n_rs_seq=n_rs_seq)
    run(mem, 0, 0, 4, planes=3)
    run(mem, 2, 0, 2, planes=3)
    mem.seq_cp(2, 3)           # a cell shared by two sequences
    run(mem, 1, 0, 1, planes=3)
    if n_rs_seq:
        assert mem.seq_rm(0, 3, -1)   # pending rollback: the snapshot plane is written
        assert mem.rs_idx()[0] == 1
    for seq in (-1, 0, 1, 2, 3):
        blob = mem.state_write(seq)
        assert blob == ref_state_bytes(mem, seq), seq
        assert len(blob) == mem._mem.state_write(seq, 0).__len__()


def test_layout_offsets_by_hand():
    mem = RecurrentMemory(2, 1, 1, mem_size=1, n_seq_max=1, n_embd_p=[2, 0])
    run(mem, 0, 0, 3)
    blob = mem.state_write(0)
    # cell count, pos, n_ids, s_trans, n_layer | layer 0: type, r row bytes, r row, P row bytes, P row |
    # layer 1: type, r row bytes, r row | layer 0: s ... | layer 1: s ...
    assert struct.unpack_from("<IiIII", blob, 0) == (1, 2, 0, 0, 2)
    assert struct.unpack_from("<iqf", blob, 20) == (0, 4, 3.0)
    assert struct.unpack_from("<qff", blob, 36) == (8, 1003.0, 1003.0)
    assert struct.unpack_from("<iqf", blob, 52) == (0, 4, 3.25)
    assert struct.unpack_from("<iqf", blob, 68) == (0, 4, -3.0)
    assert len(blob) == 84 + 16


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trips(dtype):
    mem = mem3(dtype_r=dtype, dtype_s=dtype, n_rs_seq=1)
    run(mem, 0, 0, 5, planes=2)
    run(mem, 2, 0, 3, planes=2)
    mem.seq_cp(2, 3)
    whole = mem.state_write()
    other = mem3(dtype_r=dtype, dtype_s=dtype, n_rs_seq=1)
    run(other, 1, 0, 7, value=99)
    other.state_read(whole)
    assert other.state_write() == whole
    assert other.cells()["seq_ids"][:2] == [(0,), (2, 3)]
    for il in (1, 3):
        np.testing.assert_array_equal(other.p(il)[:2], mem.p(il)[[mem.cells()["tail"][0], mem.cells()["tail"][2]]])
        assert not other.p(il)[2:].any()  # cleared beyond the restored cells, snapshot planes too
    # one sequence into another id
    one = mem.state_write(0)
    other.state_read(one, 1)
    t0, t1 = mem.cells()["tail"][0], other.cells()["tail"][1]
    for il in (1, 3):
        np.testing.assert_array_equal(other.p(il)[t1], mem.p(il)[t0])
    assert other.state_write(1) == one
    # both continue identically
    run(mem, 3, 3, 4)
    run(other, 3, 3, 4)
    assert other.state_write(3) == mem.state_write(3)


def _refused(mem, blob, seq=-1, match=None):
    before = (mem.state_write(), [mem.p(il).copy() for il in (1, 3)], [mem.r(il).copy() for il in (0, 1, 3)])
    with pytest.raises(StateError, match=match) as exc:
        mem.state_read(blob, seq)
    after = (mem.state_write(), [mem.p(il) for il in (1, 3)], [mem.r(il) for il in (0, 1, 3)])
    assert before[0] == after[0]
    for a, b in zip(before[1] + before[2], after[1] + after[2]):
        np.testing.assert_array_equal(a, b)
    return exc.value


def test_mismatched_p_is_refused_and_changes_nothing():
    target = mem3()
    run(target, 1, 0, 3)
    # a state without P (llama.cpp reads the next u64 as the P row size and refuses it)
    no_p = mem3(n_embd_p=None)
    run(no_p, 0, 0, 2)
    _refused(target, no_p.state_write(), match="p|row")
    _refused(target, no_p.state_write(0), seq=0)
    # another P width
    wider = mem3(n_embd_p=[0, 7, 0, 2])
    run(wider, 0, 0, 2)
    err = _refused(target, wider.state_write(0), seq=0, match="p \\(conv history\\) of present layer 1 has rows of 28")
    assert err.reason == "CONFIG_MISMATCH"
    # P where the reader has none
    plain = mem3(n_embd_p=None)
    run(plain, 2, 0, 1)
    with pytest.raises(StateError):
        plain.state_read(target.state_write())
    # truncated inside the P rows
    blob = target.state_write(1)
    for cut in (36 + 8 + 3, len(blob) - 1):
        _refused(target, blob[:cut], seq=1)


def test_copies_follow_s_copy_rollback_and_the_slot_moves():
    mem = mem3(n_rs_seq=2, mem_size=4)
    run(mem, 0, 0, 3, planes=3)          # p of seq 0: 1003, 1002.875, 1002.75 (+0.25 * il)
    mem.seq_cp(0, 1)
    # seq 1 forks from seq 0's state: its first computation reads seq 0's P row
    ctx = mem.init_batch(make_batch([(1, 3)]), 512)
    for _ in ctx:
        for il in (0, 1, 3):
            if mem.has_p(il):
                np.testing.assert_array_equal(ctx.get_p(il), np.full((1, mem.p(il).shape[1]), 1003 + 0.25 * il))
                ctx.store_p(il, np.full_like(ctx.get_p(il), 7.0))
    assert mem.p(1)[mem.cells()["tail"][0]][0] == 1003.25   # the source is untouched
    assert mem.p(1)[mem.cells()["tail"][1]][0] == 7.0
    # rollback by 2: the next computation reads plane 2 of the cell
    assert mem.seq_rm(0, 1, -1)
    ctx = mem.init_batch(make_batch([(0, 1)]), 512)
    for _ in ctx:
        np.testing.assert_array_equal(ctx.get_p(3), np.full((1, 2), 1003.75 - 0.25))
        np.testing.assert_array_equal(ctx.get_p(1), np.full((1, 6), 1003.25 - 0.25))
    # clear(data) zeroes P
    mem.clear(True)
    assert not mem.p(1).any() and not mem.p(3).any()


def test_slot_compaction_moves_p_rows_with_their_snapshots():
    # four sequences in separate cells; a batch of seqs 0 and 3 makes the slot contiguous and moves
    # the cells in between, P rows (and their snapshot planes) with r and s
    mem = mem3(n_rs_seq=1, mem_size=4)
    for q in range(4):
        run(mem, q, 0, 2, value=10 * q, planes=2)
    mem.seq_rm(1, -1, -1)
    mem.seq_rm(2, -1, -1)
    run(mem, 2, 0, 1, value=20, planes=2)
    before = {q: (mem.p(1)[mem.cells()["tail"][q]].copy(), mem.r(1)[mem.cells()["tail"][q]].copy()) for q in (0, 2, 3)}
    run(mem, 0, 2, 3, value=5, planes=2)
    run(mem, 3, 2, 3, value=6, planes=2)
    t = mem.cells()["tail"]
    np.testing.assert_array_equal(mem.p(1)[t[2]], before[2][0])
    np.testing.assert_array_equal(mem.r(1)[t[2]], before[2][1])
    assert mem.state_write(-1) == ref_state_bytes(mem, -1)


def test_checkpoints_carry_p():
    mem = mem3(n_rs_seq=0)
    run(mem, 0, 0, 4)
    stats = mem.checkpoint_stats()
    assert stats["checkpoint_bytes"] == 4 * (3 * 3 + 3 * 2 + 6 + 2)
    cid = mem.checkpoint_save(0)
    p_saved = [mem.p(il)[mem.cells()["tail"][0]].copy() for il in (1, 3)]
    run(mem, 0, 4, 6)
    assert mem.checkpoint_restore(cid, 2) == 3
    t2 = mem.cells()["tail"][2]
    for il, saved in zip((1, 3), p_saved):
        np.testing.assert_array_equal(mem.p(il)[t2], saved)


def test_hybrid_passes_p_through_in_both_state_formats():
    def make(fmt):
        attn = KVCache(3, [0, 8, 0], [0, 8, 0], kv_size=16, n_seq_max=2, layer_filter=lambda il: il == 1,
                       state_format=fmt)
        recr = RecurrentMemory(3, 2, 3, mem_size=2, n_seq_max=2, layer_filter=[True, False, True],
                               n_embd_p=[4, 0, 0])
        return HybridMemory(attn, recr)

    for write_fmt in (3, 4):
        src = make(write_fmt)
        ctx = src.init_batch(make_batch([(0, 0), (0, 1), (1, 0)]), 512)
        rng = np.random.default_rng(write_fmt)
        for _ in ctx:
            n = ctx.ubatch.n_tokens
            ctx.attn.cpy_k(1, rng.standard_normal((n, 8)).astype(np.float32))
            ctx.attn.cpy_v(1, rng.standard_normal((n, 8)).astype(np.float32))
            for il in (0, 2):
                ctx.recr.store_r(il, rng.standard_normal(ctx.recr.get_r(il).shape).astype(np.float32))
                ctx.recr.store_s(il, rng.standard_normal(ctx.recr.get_s(il).shape).astype(np.float32))
            ctx.recr.store_p(0, rng.standard_normal(ctx.recr.get_p(0).shape).astype(np.float32))
        assert src.memory_breakdown()["recr.p"] == 2 * 4 * 4
        recr_block = src.mem_recr.state_write()
        assert src.state_write().endswith(recr_block)  # the recurrent block follows the KV one
        for read_fmt in (3, 4):
            dst = make(read_fmt)
            dst.state_read(src.state_write())
            np.testing.assert_array_equal(dst.mem_recr.p(0), src.mem_recr.p(0))
            assert dst.mem_recr.state_write() == recr_block
            one = make(read_fmt)
            one.state_read(src.state_write(1), 0)
            np.testing.assert_array_equal(one.mem_recr.p(0)[one.mem_recr.cells()["tail"][0]],
                                          src.mem_recr.p(0)[src.mem_recr.cells()["tail"][1]])


def test_saved_file_records_p_and_restores(tmp_path):
    mem = mem3(n_rs_seq=1)
    run(mem, 0, 0, 3, planes=2)
    path = tmp_path / "p.llmem"
    mem.save(path)
    from llmem.statefile import describe_state_file, read_state_header

    cfg = read_state_header(path.read_bytes())["config"]
    assert cfg["recr.layer[1].p_row_bytes"] == 24 and cfg["recr.layer[2].p_row_bytes"] == 8
    assert "recr.layer[0].p_row_bytes" not in cfg
    # the header of a memory without P is unchanged (no P fields)
    plain = RecurrentMemory(2, 3, 2, mem_size=2)
    assert not any("p_row_bytes" in k for k in read_state_header(plain.state_write(-1, flags=llmem.STATE_HEADER))["config"])
    info = describe_state_file(path)
    assert info is not None
    other = mem3(n_rs_seq=1)
    other.load(path)
    assert other.state_write() == mem.state_write()
    with pytest.raises(StateError):
        mem3(n_rs_seq=1, n_embd_p=None).load(path)


# -- plan, from_hparams ----------------------------------------------------------------------------


def _ple_hp(**kw) -> ModelHParams:
    # a qwen3next-shaped hybrid (every 4th layer full attention) with a PLE module on layer 1
    args: dict[str, Any] = dict(arch="qwen3next", n_layer=8, n_embd=64, n_head=4, n_head_kv=2, n_ctx_train=4096,
                                ssm_d_conv=4, ssm_d_inner=128, ssm_d_state=16, ssm_n_group=2, ssm_dt_rank=8,
                                ple_layers=[il == 1 for il in range(8)], ple_ngram_size=3, ple_heads_per_ngram=2,
                                ple_conv_kernel=4, hc_mult=4)
    args.update(kw)
    return ModelHParams(**args)


def test_hparams_ple_conv_state():
    hp = _ple_hp()
    assert hp.ple_n_heads == 4
    assert hp.ple_conv_state() == (4 - 1) * 3 * 4 * 64
    assert [hp.n_embd_p(il) for il in range(8)] == [0, 2304, 0, 0, 0, 0, 0, 0]
    assert _ple_hp(ple_heads_per_ngram=0).ple_conv_state() == 0   # no heads: no PLE module
    assert _ple_hp(ple_conv_kernel=0).n_embd_p(1) == 0
    assert _ple_hp(ple_layers=None).n_embd_p(1) == 0
    with pytest.raises(ValueError, match="PLE layer 3 is not a recurrent layer"):
        _ple_hp(ple_layers=[il == 3 for il in range(8)])
    with pytest.raises(ValueError, match="ple_layers"):
        _ple_hp(ple_layers=[True])
    with pytest.raises(ValueError, match="hc_mult"):
        _ple_hp(hc_mult=-1)


@pytest.mark.parametrize("n_rs_seq", [0, 3])
def test_plan_and_from_hparams(n_rs_seq):
    hp = _ple_hp()
    plan = plan_memory(hp, 1024, n_seq_max=2, n_rs_seq=n_rs_seq)
    r = plan.recurrent
    rows = 2 * (1 + n_rs_seq)
    assert r.p is not None and r.p.name == "P" and r.p.dtype == "f32"
    assert r.p.nbytes == 2304 * rows * 4
    assert r.nbytes == r.r.nbytes + r.s.nbytes + r.p.nbytes
    assert plan.buffers()["recurrent.P"] == r.p.nbytes
    mib = lambda b: float(np.float32(b) / np.float32(1 << 20))  # noqa: E731
    assert r.log_line().endswith("P (f32): %7.2f MiB" % mib(r.p.nbytes))
    assert r.log_line().startswith("llama_memory_recurrent: size = %7.2f MiB" % mib(r.nbytes))
    mem = llmem.from_hparams(hp, 1024, n_seq_max=2, n_rs_seq=n_rs_seq)
    assert mem.mem_recr.has_p(1) and not mem.mem_recr.has_p(0)
    assert mem.mem_recr.p(1).shape == (rows, 2304)
    assert sum(mem.memory_breakdown().values()) == plan.nbytes
    assert [c["name"] for c in plan.to_dict()["components"][1]["buffers"]] == ["R", "S", "P"]
    # without PLE: no P buffer, the log line prints 0.00 as llama.cpp does
    plain = plan_memory(_ple_hp(ple_layers=None), 1024)
    assert plain.recurrent.p is None and "recurrent.P" not in plain.buffers()
    assert plain.recurrent.log_line().endswith("P (f32):    0.00 MiB")
    assert "n_embd_p" not in plain.constructor_kwargs()["recurrent"]


def test_cli_plan_table_lists_p(capsys):
    from llmem.cli import _format_plan

    text = _format_plan(plan_memory(_ple_hp(), 1024))
    assert any(line.split()[:2] == ["recurrent", "P"] for line in text.splitlines())


# -- bad arguments -------------------------------------------------------------------------------


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_embd_p has 2 entries"):
        RecurrentMemory(3, 2, 2, mem_size=1, n_embd_p=[1, 2])
    with pytest.raises(ValueError, match=r"n_embd_p\[1\]=-1"):
        RecurrentMemory(2, 2, 2, mem_size=1, n_embd_p=[1, -1])
    with pytest.raises(TypeError, match="n_embd_p"):
        RecurrentMemory(2, 2, 2, mem_size=1, n_embd_p="wide")
    with pytest.raises(TypeError, match=r"n_embd_p\(0\)"):
        RecurrentMemory(2, 2, 2, mem_size=1, n_embd_p=lambda il: 1.5)
    with pytest.raises(TypeError, match="bool"):
        RecurrentMemory(2, 2, 2, mem_size=1, n_embd_p=True)
    mem = mem3()
    with pytest.raises(ValueError, match="layer il=0 has no p state .its n_embd_p is 0"):
        mem.p(0)
    with pytest.raises(ValueError, match="left out by layer_filter"):
        mem.p(2)
    with pytest.raises(ValueError, match="il=4"):
        mem.has_p(4)
    ctx = mem.init_batch(make_batch([(0, 0)]), 512)
    for _ in ctx:
        with pytest.raises(ValueError, match="no p state"):
            ctx.get_p(0)
        with pytest.raises(ValueError, match="no p state"):
            ctx.store_p(0, np.zeros((1, 1), np.float32))
        with pytest.raises(TypeError, match="new p states of layer 1 must be float32"):
            ctx.store_p(1, np.zeros((1, 6), np.float64))
        with pytest.raises(ValueError, match=r"new p states must have shape \(1, 6\)"):
            ctx.store_p(1, np.zeros((1, 5), np.float32))
        with pytest.raises(ValueError, match=r"new p states must have shape"):
            ctx.store_p(1, np.zeros((2, 1, 6), np.float32))  # n_rs_seq = 0: one plane only
        ctx.store_p(1, np.ones((1, 6), np.float32))
        with pytest.raises(llmem.LlmemError, match="already gathered"):
            ctx.get_p(1)
    assert mem.p(1)[mem.cells()["tail"][0]].tolist() == [1.0] * 6


# -- toy models whose PLE layers keep a dilated conv history in P ---------------------------------

KERNEL, DILATION = 3, 2
HIST = (KERNEL - 1) * DILATION


class _PLEMixin:
    """A PLE-like branch on the recurrent layers listed in ``ple_layers``: u = h @ W, a depthwise
    causal conv over u dilated by DILATION with KERNEL taps, silu, added to the layer's output.
    Its last HIST inputs are the P state (qwen4exp's ple conv history)."""

    config: Any
    weights: Any
    clock: Any
    ple_layers: tuple = ()

    def _add_ple_weights(self, seed: int) -> None:
        rng = np.random.default_rng(seed + 1000)
        n = self.config.n_embd
        for il in self.ple_layers:
            lw = self.weights["layers"][il]
            lw["ple_w"] = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
            lw["ple_k"] = rng.standard_normal((KERNEL, n)).astype(np.float32)

    def n_embd_p(self) -> list:
        return [HIST * self.config.n_embd if il in self.ple_layers else 0 for il in range(self.config.n_layer)]

    @staticmethod
    def _ple(lw, h, p_prev):
        """Output [n_seqs, n_steps, n] and the input window [n_seqs, HIST + n_steps, n]."""
        n_steps = h.shape[1]
        window = np.concatenate([p_prev, h @ lw["ple_w"]], axis=1)
        out = sum(lw["ple_k"][k] * window[:, HIST - (KERNEL - 1 - k) * DILATION:][:, :n_steps]
                  for k in range(KERNEL))
        return L.silu(out), window

    def _ssm(self, lw, h, r_prev, s_prev):
        y, window, states = super()._ssm(lw, h, r_prev, s_prev)  # type: ignore[misc]
        if "ple_w" in lw:  # forward_full: the history starts from zeros
            y = y + self._ple(lw, h, np.zeros((h.shape[0], HIST, h.shape[2]), np.float32))[0]
        return y, window, states

    def _ssm_cached(self, il, lw, h, ctx, n_rs_seq):
        if "ple_w" not in lw:
            return super()._ssm_cached(il, lw, h, ctx, n_rs_seq)  # type: ignore[misc]
        n_seqs, n_steps, n = h.shape
        p_in = ctx.get_p(il)
        y_ple, window = self._ple(lw, h, p_in.astype(np.float32).reshape(n_seqs, HIST, n))
        n_planes = min(n_steps + 1, 1 + n_rs_seq)
        new_p = np.stack([window[:, n_steps - d:n_steps - d + HIST] for d in range(n_planes)])
        new_p = np.ascontiguousarray(new_p.reshape(n_planes, n_seqs, -1), dtype=p_in.dtype)
        ctx.store_p(il, new_p if n_planes > 1 else new_p[0])
        # the base mixer without the PLE branch (its _ssm call would add the zero-history branch)
        saved = lw.pop("ple_w")
        try:
            y = super()._ssm_cached(il, lw, h, ctx, n_rs_seq)  # type: ignore[misc]
        finally:
            lw["ple_w"] = saved
        return y + y_ple


class PLERecurrent(_PLEMixin, ToyRecurrent):
    ple_layers = (0, 2)

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._add_ple_weights(seed)

    def new_memory(self, n_ctx: int = 0, n_seq_max: int = 1, n_rs_seq: int = 0,  # type: ignore[override]
                   dtype: Any = np.float32, mem_size: Optional[int] = None) -> RecurrentMemory:
        cfg = self.config
        return RecurrentMemory(cfg.n_layer, cfg.n_embd_r, cfg.n_embd_s, mem_size=mem_size or max(1, n_seq_max),
                               n_seq_max=n_seq_max, n_rs_seq=n_rs_seq, dtype_r=dtype, dtype_s=dtype,
                               n_embd_p=self.n_embd_p())


class PLEHybrid(_PLEMixin, ToyHybrid):
    ple_layers = (2,)

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._add_ple_weights(seed)

    def new_memory(self, n_ctx: int, n_seq_max: int = 1, n_rs_seq: int = 0,  # type: ignore[override]
                   dtype: Any = np.float32, unified: bool = True, v_trans: bool = True) -> HybridMemory:
        plain = super().new_memory(n_ctx, n_seq_max, n_rs_seq, dtype, unified, v_trans)
        cfg = self.config
        recurrent = [plain.mem_recr.has_layer(il) for il in range(cfg.n_layer)]
        recr = RecurrentMemory(cfg.n_layer, cfg.n_embd_r, cfg.n_embd_s, mem_size=max(1, n_seq_max),
                               n_seq_max=n_seq_max, n_rs_seq=n_rs_seq, dtype_r=dtype, dtype_s=dtype,
                               layer_filter=recurrent, n_embd_p=self.n_embd_p())
        return HybridMemory(attn=plain.mem_attn, recr=recr, is_recurrent_layer=recurrent)


PLE_MODEL = PLERecurrent(seed=7)
PLE_HYBRID = PLEHybrid(seed=8)


def test_toy_ple_branch_changes_the_output():
    # the P branch matters: the same weights without it give other logits
    tokens = [1, 5, 9, 2, 7, 3]
    plain = ToyRecurrent(seed=7)
    assert not np.allclose(PLE_MODEL.forward_full(tokens), plain.forward_full(tokens), atol=1e-3)


@pytest.mark.parametrize("n_rs_seq", [0, 3])
def test_toy_ple_recurrent_decodes_as_from_scratch(n_rs_seq):
    make = lambda: PLE_MODEL.new_memory(n_seq_max=4, n_rs_seq=n_rs_seq)  # noqa: E731
    prompt_then_tokens(PLE_MODEL, make(), seed=40)
    parallel_sequences(PLE_MODEL, make(), seed=41, n_ubatch=5 if n_rs_seq else 2)
    prefix_sharing(PLE_MODEL, make(), seed=42)
    state_round_trip(PLE_MODEL, make, seed=43)


@pytest.mark.parametrize("n_back", [1, 3])
def test_toy_ple_rollback_then_redecode(n_back):
    rng = np.random.default_rng(44 + n_back)
    v = PLE_MODEL.config.n_vocab
    s = Session(PLE_MODEL, PLE_MODEL.new_memory(n_seq_max=2, n_rs_seq=3))
    s.feed({0: random_tokens(rng, 7, v), 1: random_tokens(rng, 4, v)})
    s.feed({0: random_tokens(rng, 3, v), 1: random_tokens(rng, 3, v)})
    for q in (0, 1):
        assert s.seq_rm_tail(q, s.pos[q][-1] - n_back + 1)
    s.feed({0: random_tokens(rng, 2, v), 1: random_tokens(rng, 1, v)})
    s.check()


def test_toy_ple_checkpoint_restore_continues_exactly():
    rng = np.random.default_rng(50)
    v = PLE_MODEL.config.n_vocab
    s = Session(PLE_MODEL, PLE_MODEL.new_memory(n_seq_max=2))
    s.feed({0: random_tokens(rng, 6, v)})
    cid = s.memory.checkpoint_save(0)
    assert s.memory.checkpoint_restore(cid, 1) == 5
    s.tokens[1], s.pos[1] = list(s.tokens[0]), list(s.pos[0])
    s.feed({0: random_tokens(rng, 3, v), 1: random_tokens(rng, 2, v)})
    s.check()


@pytest.mark.parametrize("n_rs_seq", [0, 2])
def test_toy_ple_hybrid_decodes_as_from_scratch(n_rs_seq):
    make = lambda: PLE_HYBRID.new_memory(64, n_seq_max=4, n_rs_seq=n_rs_seq)  # noqa: E731
    prompt_then_tokens(PLE_HYBRID, make(), seed=60)
    parallel_sequences(PLE_HYBRID, make(), seed=61, n_ubatch=5)
    state_round_trip(PLE_HYBRID, make, seed=62)
