"""State bytes of RecurrentMemory: llama.cpp's layout (spec 5.14, tricky cases 39-45, the oracle's
mamba example), round trips, and every refusal leaving the memory bit-identical."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import llmem
from llmem import LlmemError, RecurrentMemory, StateError, Status


def make_batch(entries):
    seq_id = [[e[0]] if isinstance(e[0], int) else list(e[0]) for e in entries]
    pos = np.array([e[1] for e in entries], dtype=np.int32)
    return llmem.Batch(token=np.zeros(len(entries), np.int32), pos=pos, seq_id=seq_id)


def run(mem, seq, p0, p1, value=None):
    """Decode seq at [p0, p1); store `value` (default: seq + p1) as its new r and s states."""
    ctx = mem.init_batch(make_batch([(seq, p) for p in range(p0, p1)]), 512)
    assert ctx.status == Status.SUCCESS
    for _ in ctx:
        for il in range(mem.n_layer):
            if mem.has_layer(il):
                r, s = ctx.get_r(il), ctx.get_s(il)
                v = float(seq + p1 if value is None else value) + 0.25 * il
                ctx.store_r(il, np.full_like(r, v))
                ctx.store_s(il, np.full_like(s, -v))


def observe(mem):
    """Everything a caller can see of the memory."""
    c = mem.cells()
    arrays = [(mem.r(il).tobytes(), mem.s(il).tobytes()) for il in range(mem.n_layer) if mem.has_layer(il)]
    return ([c[k].tolist() for k in ("pos", "src", "src0", "tail")], c["seq_ids"], mem.used, mem.head, mem.n,
            mem.rs_z, mem.rs_idx().tolist(), arrays)


def two_layer(**kw):
    args = dict(n_layer=2, n_embd_r=2, n_embd_s=2, mem_size=4, n_seq_max=4)
    args.update(kw)
    return RecurrentMemory(**args)


# -- layout ---------------------------------------------------------------------------------------


def test_tricky_39_layout_and_sizes():
    mem = two_layer()
    ctx = mem.init_batch(make_batch([(0, p) for p in range(4)]), 512)
    for _ in ctx:
        pass
    ctx = mem.init_batch(make_batch([(1, 0)]), 512)
    for _ in ctx:
        pass
    whole = mem.state_write(-1)
    assert len(whole) == 148
    assert whole[:40].hex() == (
        "02000000" "03000000" "01000000" "00000000" "00000000" "01000000" "01000000" "00000000" "02000000"
        "00000000")
    assert struct.unpack_from("<q", whole, 40)[0] == 8  # r_row_bytes
    single = mem.state_write(0)
    assert len(single) == 100
    assert struct.unpack_from("<Iii", single, 0) == (1, 3, 0)  # one cell, pos 3, no ids
    assert len(mem.state_write(2)) == 60  # tricky 40: a sequence without a cell
    assert mem.state_write(0, flags=1) == single  # PARTIAL_ONLY is ignored


def test_oracle_mamba_sequence_block_size_and_layout():
    # oracle README: mamba (2 layers, r row 768 bytes, s row 4096 bytes), two tokens in seq 0:
    # the sequence blob is 9804 bytes, 8 of them the magic and seq id in front of this block
    mem = RecurrentMemory(2, 192, 1024, mem_size=1, n_seq_max=1)
    run(mem, 0, 0, 2)
    blob = mem.state_write(0)
    assert len(blob) + 8 == 9804
    assert struct.unpack_from("<IiIII", blob, 0) == (1, 1, 0, 0, 2)
    assert struct.unpack_from("<iq", blob, 20) == (0, 768)
    assert struct.unpack_from("<iq", blob, 1580) == (0, 4096)  # 1588 - 8 in the oracle's offsets


def test_lfm2_like_layout_counts_every_layer_and_keeps_empty_s_rows():
    # 4 model layers, layers 1 and 3 recurrent, s rows of 0 bytes (listed with no data)
    mem = RecurrentMemory(4, 64, 0, mem_size=2, n_seq_max=2, layer_filter=[False, True, False, True])
    run(mem, 1, 0, 3)
    blob = mem.state_write(1)
    assert struct.unpack_from("<II", blob, 12) == (0, 4)  # s_trans, n_layer
    assert len(blob) == 4 + 8 + 8 + 2 * (12 + 256) + 2 * (12 + 0)
    other = RecurrentMemory(4, 64, 0, mem_size=2, n_seq_max=2, layer_filter=[False, True, False, True])
    other.state_read(blob, 0)
    assert other.r(3)[other.cells()["tail"][0]].tolist() == mem.r(3)[mem.cells()["tail"][1]].tolist()


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_whole_memory(dtype):
    mem = two_layer(dtype_r=dtype, dtype_s=dtype, n_embd_r=3, n_embd_s=5)
    run(mem, 0, 0, 4)
    run(mem, 2, 0, 2)
    mem.seq_cp(2, 3)
    blob = mem.state_write()
    other = two_layer(dtype_r=dtype, dtype_s=dtype, n_embd_r=3, n_embd_s=5)
    run(other, 1, 0, 9, value=99)
    other.state_read(blob)
    assert other.state_write() == blob
    assert other.cells()["seq_ids"][:2] == [(0,), (2, 3)]
    assert other.used == 2 and other.head == 0
    for s in range(4):
        assert other.seq_pos_max(s) == mem.seq_pos_max(s)
    assert not other.r(0)[2:].any()  # cleared beyond the restored cells
    # decoding continues identically in both
    run(mem, 3, 2, 3)
    run(other, 3, 2, 3)
    assert other.state_write() == mem.state_write()


def test_round_trip_one_sequence_into_another_id():
    mem = two_layer()
    run(mem, 0, 0, 6)
    run(mem, 1, 0, 2)
    blob = mem.state_write(0)
    mem.state_read(blob, 3)
    assert mem.seq_pos_max(3) == 5 and mem.seq_pos_max(0) == 5
    t0, t3 = mem.cells()["tail"][[0, 3]]
    assert t0 != t3
    for il in range(2):
        assert mem.r(il)[t3].tolist() == mem.r(il)[t0].tolist()
        assert mem.s(il)[t3].tolist() == mem.s(il)[t0].tolist()
    assert mem.state_write(3) == blob
    # into an id that already has a state: it is replaced
    mem.state_read(blob, 1)
    assert mem.seq_pos_max(1) == 5 and mem.state_write(1) == blob
    # tricky 40: the empty block erases the destination
    mem.state_read(mem.state_write(2), 1)
    assert mem.seq_pos_max(1) == -1


def test_pending_rollback_is_saved_as_its_snapshot():
    mem = two_layer(mem_size=2, n_seq_max=2, n_rs_seq=2, n_embd_s=1)
    ctx = mem.init_batch(make_batch([(0, p) for p in range(3)]), 8)
    for _ in ctx:
        for il in range(2):
            ctx.get_s(il)
            ctx.store_s(il, np.array([[[3.0]], [[2.0]], [[1.0]]], np.float32))
    assert mem.seq_rm(0, 2, -1)
    blob = mem.state_write(0)
    other = two_layer(mem_size=2, n_seq_max=2, n_rs_seq=2, n_embd_s=1)
    other.state_read(blob, 1)
    assert other.seq_pos_max(1) == 1
    assert other.s(0)[other.cells()["tail"][1]].tolist() == [2.0]
    assert other.rs_idx().tolist() == [0, 0]


# -- refusals -------------------------------------------------------------------------------------


def _busy_memory():
    """A memory with shared cells, a pending rollback and non-zero arrays."""
    mem = two_layer(n_seq_max=3, n_rs_seq=1)
    run(mem, 2, 0, 6)
    run(mem, 0, 0, 3)
    mem.seq_cp(2, 1)
    assert mem.seq_rm(0, 2, -1)  # pending rollback of seq 0
    return mem


def _blobs():
    src = two_layer(n_seq_max=4)
    run(src, 0, 0, 4)
    run(src, 1, 0, 2)
    return src.state_write(-1), src.state_write(0)


def _corrupt(blob, offset, fmt, value):
    b = bytearray(blob)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _bad_blocks():
    whole, single = _blobs()
    # single block: [0] count, [4] pos, [8] n_ids, [12] s_trans, [16] n_layer, [20] r_type, [24] r_row
    bad_single = {
        "n_layer": _corrupt(single, 16, "<I", 3),
        "r dtype": _corrupt(single, 20, "<i", 1),
        "r row size": _corrupt(single, 24, "<q", 12),
        "s_trans": _corrupt(single, 12, "<I", 1),
        "two cells": struct.pack("<IiIiI", 2, 5, 0, 6, 0) + single[12:],
        "trailing byte": single + b"\0",
        "whole block (cells with ids)": whole,
        "s dtype": _corrupt(single, 60, "<i", 1),  # after 2 r layers of 12 + 8 bytes
    }
    for cut in range(len(single)):
        bad_single[f"truncated at {cut}"] = single[:cut]
    # whole block: [0] count, cell 0 at [4..16), cell 1 at [16..28): pos, n_ids, id
    bad_whole = {
        "cell_count > size": _corrupt(whole, 0, "<I", 5),
        "id >= n_seq_max": _corrupt(whole, 24, "<i", 3),
        "negative id": _corrupt(whole, 24, "<i", -1),
        "same id in two cells": _corrupt(whole, 24, "<i", 0),
        "huge id count": _corrupt(whole, 20, "<I", 2**31),
        "n_layer": _corrupt(whole, 32, "<I", 1),
        "trailing bytes": whole + b"\0\0\0\0",
    }
    for cut in range(len(whole)):
        bad_whole[f"truncated at {cut}"] = whole[:cut]
    return bad_single, bad_whole


BAD_SINGLE, BAD_WHOLE = _bad_blocks()


@pytest.mark.parametrize("name", sorted(BAD_SINGLE))
def test_refused_single_sequence_read_changes_nothing(name):
    mem = _busy_memory()
    before = observe(mem)
    with pytest.raises(StateError):
        mem.state_read(BAD_SINGLE[name], 1)
    assert observe(mem) == before


@pytest.mark.parametrize("name", sorted(BAD_WHOLE))
def test_refused_whole_read_changes_nothing(name):
    mem = _busy_memory()
    before = observe(mem)
    with pytest.raises(StateError):
        mem.state_read(BAD_WHOLE[name], -1)
    assert observe(mem) == before


def test_refused_read_of_an_id_beyond_size_changes_nothing():
    whole, single = _blobs()
    # a whole block holding id 2 into a memory of 2 cells but n_seq_max 4: llama.cpp would write
    # a tail outside its cell array; llmem refuses
    mem = two_layer(mem_size=2, n_seq_max=4)
    run(mem, 0, 0, 1)
    before = observe(mem)
    with pytest.raises(StateError):
        mem.state_read(_corrupt(whole, 24, "<i", 2), -1)
    assert observe(mem) == before
    with pytest.raises(StateError):
        mem.state_read(single, 3)  # sequence 3 has no tail in a 2-cell memory
    assert observe(mem) == before


def test_differently_shaped_memory_refuses():
    whole, single = _blobs()
    for other in (two_layer(n_embd_r=3), two_layer(dtype_s=np.float16), two_layer(n_layer=3),
                  two_layer(layer_filter=[True, False]), two_layer(mem_size=1)):
        before = observe(other)
        with pytest.raises(StateError):
            other.state_read(whole)
        assert observe(other) == before


def test_tricky_45_cell_without_ids():
    whole, _ = _blobs()
    # cell 0 (pos 3, one id) becomes pos 3 with no ids; cell 1 stays
    blob = whole[:8] + struct.pack("<I", 0) + whole[16:]
    mem = two_layer()
    mem.state_read(blob)
    c = mem.cells()
    assert c["pos"][0] == 3 and c["seq_ids"][0] == () and mem.used == 2


def test_state_write_refusals_change_nothing():
    mem = two_layer(mem_size=3, n_seq_max=3, n_rs_seq=2, compat="b11312")  # b11549 refuses this rollback
    run(mem, 1, 0, 4)
    mem.seq_cp(1, 0)
    assert mem.seq_rm(1, 3, -1)
    before = observe(mem)
    with pytest.raises(LlmemError):
        mem.state_write()  # tricky 38
    assert observe(mem) == before
    mem2 = two_layer()
    for s in range(3):
        run(mem2, s, 0, 1)
    assert mem2.seq_rm(1)
    with pytest.raises(LlmemError, match="contiguous"):
        mem2.state_write(flags=2)
    assert len(mem2.state_write(0, flags=2)) == 100
