"""The versioned state header (llmem.STATE_HEADER), save/load for every memory type, and the
hardening of state_read against damaged bytes (hypothesis over bytes; the C++ fuzzer in fuzz/ runs
the same idea at a million inputs under ASan/UBSan, see docs/reliability.md)."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

import llmem
from llmem import (Batch, HybridISWAMemory, HybridMemory, KVCache, KVCacheISWA, RecurrentMemory, StateError,
                   Status, SWAType)

from hypothesis_profiles import model_settings

HEADER = llmem.STATE_HEADER
PARTIAL_ONLY = 1
FIXED = struct.Struct("<8sIIIiIIQI")  # magic, version, kind, flags, seq, n_fields, config bytes, payload len, crc


def kv(n_layer=2, n_seq=3, size=16, dtype=np.float16, unified=True):
    return KVCache(n_layer, 4, 4, size, n_seq_max=n_seq, unified=unified, dtype_k=dtype, dtype_v=dtype)


def iswa(n_seq=3):
    return KVCacheISWA(n_layer=3, n_embd_k_gqa=4, n_embd_v_gqa=4, kv_size=16, n_seq_max=n_seq, n_swa=2,
                       swa_type=SWAType.STANDARD, swa_full=True, is_swa_layer=[True, False, True])


def recurrent(n_seq=3, n_rs_seq=1):
    return RecurrentMemory(n_layer=2, n_embd_r=3, n_embd_s=[2, 5], mem_size=n_seq, n_seq_max=n_seq,
                           n_rs_seq=n_rs_seq)


def hybrid(n_seq=3):
    attn = KVCache(2, 4, 4, 16, n_seq_max=n_seq, layer_filter=lambda il: il == 0)
    recr = RecurrentMemory(2, [0, 3], [0, 2], mem_size=n_seq, n_seq_max=n_seq, layer_filter=lambda il: il == 1)
    return HybridMemory(attn=attn, recr=recr, is_recurrent_layer=[False, True])


def hybrid_iswa(n_seq=3):
    attn = KVCacheISWA(n_layer=3, n_embd_k_gqa=4, n_embd_v_gqa=4, kv_size=16, n_seq_max=n_seq, n_swa=2,
                       swa_type=SWAType.STANDARD, swa_full=True, is_swa_layer=[True, False, False],
                       layer_filter=lambda il: il < 2)
    recr = RecurrentMemory(3, [0, 0, 3], [0, 0, 2], mem_size=n_seq, n_seq_max=n_seq,
                           layer_filter=lambda il: il == 2)
    return HybridISWAMemory(attn=attn, recr=recr, is_recurrent_layer=[False, False, True])


MAKERS = {"KVCache": kv, "KVCacheISWA": iswa, "RecurrentMemory": recurrent, "HybridMemory": hybrid,
          "HybridISWAMemory": hybrid_iswa}
KINDS = {"KVCache": 1, "KVCacheISWA": 2, "RecurrentMemory": 3, "HybridMemory": 4, "HybridISWAMemory": 5}


def buffers(mem):
    """Every state array the memory owns."""
    if isinstance(mem, (HybridMemory, HybridISWAMemory)):
        return buffers(mem.mem_attn) + buffers(mem.mem_recr)
    if isinstance(mem, KVCacheISWA):
        return buffers(mem.base) + buffers(mem.swa)
    if isinstance(mem, KVCache):
        return [a for il in mem.layers for a in (mem.k(il), mem.v(il))]
    return [a for il in range(mem.n_layer) if mem.has_layer(il) for a in (mem.r(il), mem.s(il))]


def fingerprint(mem):
    """State bytes, cell metadata and every buffer byte."""
    h = hashlib.sha256(mem.state_write(-1))
    h.update(repr(mem.cells()).encode())
    for a in buffers(mem):
        h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
    return h.hexdigest()


def filled(name, n_seq=3, lengths=(3, 2, 0), seed=0):
    """A memory of kind `name` with sequences decoded and random state bytes."""
    mem = MAKERS[name](n_seq=n_seq)
    for s, n in enumerate(lengths[:n_seq]):
        if n:
            ctx = mem.init_batch(Batch(token=np.zeros(n, np.int32), seq_id=np.full(n, s, np.int32)), 4)
            assert ctx.status == Status.SUCCESS
            list(ctx)
    rng = np.random.default_rng(seed)
    for a in buffers(mem):
        a.view(np.uint8)[...] = rng.integers(0, 256, a.nbytes, dtype=np.uint8).reshape(a.view(np.uint8).shape)
    return mem


# -- the header ------------------------------------------------------------------------------------

def parse_header(blob):
    """The header fields, read with nothing but struct and zlib (the byte table of
    docs/reliability.md)."""
    magic, version, kind, flags, seq, n_fields, config_bytes, payload_len, payload_crc = FIXED.unpack_from(blob)
    at, fields = FIXED.size, []
    for _ in range(n_fields):
        n = blob[at]
        name = blob[at + 1:at + 1 + n].decode()
        (value,) = struct.unpack_from("<q", blob, at + 1 + n)
        fields.append((name, value))
        at += 1 + n + 8
    assert at == FIXED.size + config_bytes
    (header_crc,) = struct.unpack_from("<I", blob, at)
    assert header_crc == zlib.crc32(blob[:at])
    payload = blob[at + 4:]
    assert payload_len == len(payload) and payload_crc == zlib.crc32(payload)
    return dict(magic=magic, version=version, kind=kind, flags=flags, seq=seq, fields=dict(fields)), payload


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_header_records_the_configuration_and_wraps_the_raw_bytes(name):
    mem = filled(name)
    for seq in (-1, 0, 1):
        raw = mem.state_write(seq)
        blob = mem.state_write(seq, HEADER)
        head, payload = parse_header(blob)
        assert payload == raw  # the llama.cpp layout is unchanged behind the header
        assert head["magic"] == b"LLMEMSTF" and head["version"] == 1
        assert (head["kind"], head["flags"], head["seq"]) == (KINDS[name], HEADER, seq)
    fields = head["fields"]
    if name == "KVCache":
        assert fields["attn.n_layer"] == 2 and fields["attn.kv_size"] == 16 and fields["attn.type_k"] == 1
    if "ISWA" in name:
        assert fields["swa.n_swa"] == 2 and fields["swa.swa_type"] == int(SWAType.STANDARD)
        assert fields["base.n_swa"] == 0
    if name in ("RecurrentMemory", "HybridMemory", "HybridISWAMemory"):
        assert fields["recr.size"] == 3 and fields["recr.layer[0].r_row_bytes"] == 12


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_save_load_round_trip_every_memory(name, tmp_path):
    src = filled(name, seed=1)
    path = tmp_path / "state.bin"
    src.save(path)
    assert path.read_bytes().startswith(b"LLMEMSTF")  # save writes the header by default
    dst = filled(name, lengths=(1, 0, 4), seed=2)
    dst.load(path)
    assert dst.state_write(-1) == src.state_write(-1)
    # one sequence into another one
    src.save(path, 0)
    dst.load(path, 2)
    assert dst.seq_pos_max(2) == src.seq_pos_max(0)
    # raw llama.cpp bytes still load (no magic: read without the header)
    src.save(path, flags=0)
    assert path.read_bytes() == src.state_write(-1)
    fresh = MAKERS[name]()
    fresh.load(path)
    assert fresh.state_write(-1) == src.state_write(-1)
    # ... unless the caller requires the header
    with pytest.raises(StateError, match="magic"):
        fresh.load(path, flags=HEADER)


@pytest.mark.parametrize("name", ["KVCacheISWA", "HybridMemory", "HybridISWAMemory"])
def test_partial_only_is_recorded_and_checked(name, tmp_path):
    src = filled(name)
    blob = src.state_write(0, HEADER | PARTIAL_ONLY)
    assert parse_header(blob)[1] == src.state_write(0, PARTIAL_ONLY)
    dst = filled(name, seed=3)
    before = fingerprint(dst)
    with pytest.raises(StateError, match="PARTIAL_ONLY: file 1, read 0"):
        dst.state_read(blob, 1, HEADER)
    assert fingerprint(dst) == before
    dst.state_read(blob, 1, HEADER | PARTIAL_ONLY)
    src.save(tmp_path / "p.bin", 0, flags=HEADER | PARTIAL_ONLY)
    dst.load(tmp_path / "p.bin", 2, flags=PARTIAL_ONLY)


MISMATCHES = [
    # (writer, reader, message)
    (lambda: kv(n_layer=4), lambda: kv(n_layer=2), "attn.n_layer: file 4, memory 2"),
    (lambda: kv(size=32), lambda: kv(size=16), "attn.kv_size: file 32, memory 16"),
    (lambda: kv(dtype=np.float32), lambda: kv(), "attn.type_k: file 0, memory 1"),
    (lambda: kv(unified=False), lambda: kv(), "attn.n_stream: file 3, memory 1"),
    (lambda: kv(n_seq=2), lambda: kv(), "attn.n_seq_max: file 2, memory 3"),
    (lambda: recurrent(n_rs_seq=0), lambda: recurrent(), "recr.n_rs_seq: file 0, memory 1"),
    (lambda: kv(), lambda: iswa(), r"memory kind: file KVCache \(1\), memory KVCacheISWA \(2\)"),
    (lambda: recurrent(), lambda: hybrid(), "memory kind: file RecurrentMemory"),
    (lambda: hybrid(n_seq=2), lambda: hybrid(), "attn.n_seq_max: file 2, memory 3"),
]


@pytest.mark.parametrize("writer, reader, message", MISMATCHES)
def test_configuration_mismatch_is_named_and_changes_nothing(writer, reader, message):
    blob = writer().state_write(-1, HEADER)
    mem = reader()
    before = fingerprint(mem)
    with pytest.raises(StateError, match=message):
        mem.state_read(blob, -1, HEADER)
    assert fingerprint(mem) == before


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_damaged_headers_are_refused(name):
    src = filled(name)
    blob = bytearray(src.state_write(0, HEADER))
    mem = filled(name, seed=4)
    before = fingerprint(mem)
    _, payload = parse_header(bytes(blob))
    header_len = len(blob) - len(payload)

    def refused(data, match, seq=0, flags=HEADER):
        with pytest.raises(StateError, match=match):
            mem.state_read(bytes(data), seq, flags)
        assert fingerprint(mem) == before

    refused(blob, "scope: the file holds one sequence", seq=-1)
    refused(blob[:20], "truncated")
    refused(blob[:header_len - 1], "truncated or corrupt")
    refused(blob[:-1], "payload length")
    refused(blob + b"\0", "payload length")
    flipped = bytearray(blob)
    flipped[-1] ^= 0x10
    refused(flipped, "payload checksum")
    flipped = bytearray(blob)
    flipped[FIXED.size + 3] ^= 0x01  # inside the configuration record
    refused(flipped, "header checksum")
    newer = bytearray(blob)
    struct.pack_into("<I", newer, 8, 2)
    refused(newer, "format version 2")
    refused(b"GGSQ" + blob[4:], "magic")
    # raw bytes read with the header flag, and header bytes read without it
    refused(src.state_write(0), "magic")
    with pytest.raises(StateError):
        mem.state_read(bytes(blob), 0)
    assert fingerprint(mem) == before
    mem.state_read(bytes(blob), 0, HEADER)  # the undamaged blob still reads


def test_raw_layout_without_the_flag_is_unchanged():
    mem = filled("KVCache")
    # flags without STATE_HEADER give exactly the bytes the llama.cpp layout code writes
    assert mem.state_write(-1) == mem._core.state_write(-1)
    assert not mem.state_write(0).startswith(b"LLMEMSTF")
    assert HEADER == 1 << 31 and HEADER & PARTIAL_ONLY == 0


# -- hardening: damaged bytes into every memory (hypothesis over bytes) -----------------------------

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**16]


@st.composite
def damaged(draw):
    name = draw(st.sampled_from(sorted(MAKERS)))
    seq = draw(st.sampled_from([-1, 0, 1]))
    flags = draw(st.sampled_from([0, HEADER]))
    blob = bytearray(filled(name, seed=5).state_write(seq, flags))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "u32", "truncate", "extend"]))
        if op == "flip" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "u32" and len(blob) >= 4:
            i = draw(st.integers(0, len(blob) // 4 - 1)) * 4
            struct.pack_into("<I", blob, i, draw(st.sampled_from(INTERESTING)))
        elif op == "truncate":
            del blob[draw(st.integers(0, len(blob))):]
        else:
            blob += draw(st.binary(min_size=1, max_size=16))
    target = draw(st.sampled_from([-1, 0, 2])) if seq >= 0 else -1
    return name, bytes(blob), target, flags


@model_settings(150, suppress_health_check=[HealthCheck.data_too_large])
@given(case=damaged())
def test_damaged_state_is_refused_cleanly_or_read_consistently(case):
    name, blob, seq, flags = case
    mem = filled(name, lengths=(1, 3, 2), seed=6)
    before = fingerprint(mem)
    try:
        mem.state_read(blob, seq, flags)
    except StateError:
        assert fingerprint(mem) == before
        return
    # accepted (a damaged value that is still a valid state): the memory must write and
    # read itself back to the same bytes
    again = mem.state_write(-1, HEADER)
    fresh = MAKERS[name]()
    fresh.state_read(again, -1, HEADER)
    assert fresh.state_write(-1, HEADER) == again
