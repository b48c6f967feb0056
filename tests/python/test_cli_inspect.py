"""``llmem inspect STATEFILE``: what a saved state holds."""

import json

import numpy as np
import pytest

import llmem
from llmem import Batch, SWAType
from llmem import cli

EMBD = 8


def decode(mem, seq_ids):
    ctx = mem.init_batch(Batch(token=np.zeros(len(seq_ids), np.int32), seq_id=np.array(seq_ids, np.int32)), 64)
    for _ in ctx:
        pass


def inspect(capsys, *argv):
    code = cli.main(["inspect", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def kv(**kw):
    args = dict(n_layer=2, n_embd_k_gqa=EMBD, n_embd_v_gqa=[EMBD, 16], kv_size=32, n_seq_max=4)
    args.update(kw)
    return llmem.KVCache(**args)


def test_inspect_kv_whole_memory(tmp_path, capsys):
    cache = kv(dtype_k=np.float32)
    decode(cache, [0, 0, 0, 2, 2, 3])
    path = tmp_path / "kv.llmem"
    cache.save(path)
    code, out, _ = inspect(capsys, path)
    assert code == 0
    assert "memory      KVCache, whole memory" in out
    assert "32 cells x 1 stream(s), 2 layers, n_seq_max 4, type_k 0, type_v 1" in out
    assert "sequences   3" in out
    assert "seq 0     positions 0..2   cells: attn 3" in out
    assert "seq 3     positions 0..0   cells: attn 1" in out
    assert "attn        6 of 32 cells used" in out
    code, out, _ = inspect(capsys, path, "--json")
    d = json.loads(out)
    assert d["kind"] == "KVCache" and d["sequences"] == {"0": [0, 2], "2": [0, 1], "3": [0, 0]}
    assert d["parts"]["attn"]["cells_per_seq"] == {"0": 3, "2": 2, "3": 1}
    assert d["file_bytes"] == path.stat().st_size == d["header_bytes"] + d["payload_bytes"]


def test_inspect_one_sequence_of_a_multi_stream_cache(tmp_path, capsys):
    cache = kv(unified=False, kv_size=8)
    decode(cache, [1, 1, 2])
    path = tmp_path / "seq1.llmem"
    cache.save(path, 1)
    code, out, _ = inspect(capsys, path)
    assert code == 0 and "sequence 1" in out and "8 cells x 4 stream(s)" in out
    assert "seq 1     positions 0..1   cells: attn 2" in out


def test_inspect_iswa_and_hybrid(tmp_path, capsys):
    iswa = llmem.KVCacheISWA(n_layer=3, n_embd_k_gqa=EMBD, n_embd_v_gqa=EMBD, kv_size=512, n_seq_max=2,
                             n_swa=8, swa_type=SWAType.STANDARD, n_ubatch=16, is_swa_layer=[True, False, True])
    decode(iswa, [0] * 5 + [1] * 2)
    iswa.save(tmp_path / "iswa.llmem")
    code, out, _ = inspect(capsys, tmp_path / "iswa.llmem")
    assert code == 0 and "KVCacheISWA" in out
    assert "seq 0     positions 0..4   cells: base 5, swa 5" in out

    attn = kv(n_seq_max=2)
    recr = llmem.RecurrentMemory(n_layer=3, n_embd_r=4, n_embd_s=6, mem_size=2, n_seq_max=2,
                                 layer_filter=[False, False, True])
    hyb = llmem.HybridMemory(llmem.KVCache(n_layer=3, n_embd_k_gqa=EMBD, n_embd_v_gqa=EMBD, kv_size=32,
                                           n_seq_max=2, layer_filter=lambda il: il < 2), recr)
    decode(hyb, [0, 0, 1])
    hyb.save(tmp_path / "hyb.llmem")
    code, out, _ = inspect(capsys, tmp_path / "hyb.llmem")
    assert code == 0 and "HybridMemory" in out and "recr      2 cells, 3 layers (1 with state)" in out
    assert "seq 0     positions 1..1   cells: attn 2, recr 1" in out  # a hybrid's min: the recurrent part's
    del attn


def test_inspect_cell_map_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cache = kv(unified=False, kv_size=16)
    decode(cache, [0, 0, 1, 3, 3, 3])
    cache.save(tmp_path / "s.llmem")
    code, out, _ = inspect(capsys, tmp_path / "s.llmem", "--png", tmp_path / "map.png")
    assert code == 0 and "cell map" in out
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_refuses_what_it_cannot_read(tmp_path, capsys):
    cache = kv()
    decode(cache, [0])
    raw = tmp_path / "raw.bin"
    cache.save(raw, flags=0)
    code, out, err = inspect(capsys, raw)
    assert code == 2 and out == "" and "CORRUPT" in err and "no versioned header" in err
    good = tmp_path / "good.llmem"
    cache.save(good)
    data = bytearray(good.read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "bad.llmem").write_bytes(bytes(data))
    code, _, err = inspect(capsys, tmp_path / "bad.llmem")
    assert code == 2 and "checksum" in err
    code, _, err = inspect(capsys, tmp_path / "missing.llmem")
    assert code == 2 and "No such file" in err
