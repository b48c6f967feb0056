"""stats() on every memory, the "llmem" logger, and the Prometheus example."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import llmem
from llmem import Batch, KVCache, Rope, Status, SWAType

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMBD = 8
KEYS = {"kind", "cells", "cells_used", "cells_used_per_stream", "sequences", "tokens_placed",
        "plans_failed_no_room", "state_bytes_written", "state_bytes_read", "state_reads_refused",
        "k_shifts", "parts"}


def decode(mem, seq_ids, n_ubatch=64):
    ctx = mem.init_batch(Batch(token=np.zeros(len(seq_ids), np.int32), seq_id=np.array(seq_ids, np.int32)),
                         n_ubatch)
    if ctx.status != Status.SUCCESS:
        return ctx
    for _ in ctx:
        pass
    return ctx


def kv(**kw):
    args = dict(n_layer=1, n_embd_k_gqa=EMBD, n_embd_v_gqa=EMBD, kv_size=16, n_seq_max=3)
    args.update(kw)
    return KVCache(**args)


def test_kv_stats_count_what_happened():
    cache = kv(rope=Rope(n_rot=4))
    s = cache.stats()
    assert set(s) == KEYS and s["kind"] == "KVCache" and s["parts"] == {}
    assert (s["cells"], s["cells_used"], s["sequences"], s["tokens_placed"]) == (16, 0, 0, 0)
    decode(cache, [0, 0, 0, 1, 1], n_ubatch=2)
    decode(cache, [0, 1])
    blob = cache.state_write(0)
    n_into = cache.state_write_into(bytearray(cache.state_size(1)), 1)
    cache.seq_rm(0)
    cache.state_read(blob, 0)
    with pytest.raises(llmem.StateError):
        cache.state_read(blob[:3], 2)
    assert decode(cache, [2] * 20).status == Status.FAILED_PREPARE
    cache.seq_add(0, 0, -1, 2)
    cache.init_update().apply()
    s = cache.stats()
    assert s["cells_used"] == 7 and s["cells_used_per_stream"] == [7] and s["sequences"] == 2
    assert s["tokens_placed"] == 7  # the restore places cells, not tokens of a batch
    assert s["plans_failed_no_room"] == 1
    assert s["state_bytes_written"] == len(blob) + n_into
    assert s["state_bytes_read"] == len(blob) and s["state_reads_refused"] == 1
    assert s["k_shifts"] == 1


def test_stats_per_stream_and_save_load(tmp_path):
    cache = kv(unified=False, kv_size=8)
    decode(cache, [0, 0, 2])
    path = tmp_path / "all.llmem"
    cache.save(path)
    cache.load(path)
    s = cache.stats()
    assert s["cells"] == 24 and s["cells_used_per_stream"] == [2, 0, 1]
    size = path.stat().st_size
    assert s["state_bytes_written"] == size and s["state_bytes_read"] == size


def test_composite_stats_have_parts():
    iswa = llmem.KVCacheISWA(n_layer=2, n_embd_k_gqa=EMBD, n_embd_v_gqa=EMBD, kv_size=16, n_seq_max=2,
                             n_swa=4, swa_type=SWAType.STANDARD, n_ubatch=4, swa_full=True,
                             is_swa_layer=[False, True])
    decode(iswa, [0, 0, 1])
    s = iswa.stats()
    assert set(s["parts"]) == {"base", "swa"} and s["kind"] == "KVCacheISWA"
    assert s["cells"] == 32 and s["cells_used"] == 6 and s["cells_used_per_stream"] == [6]
    assert s["sequences"] == 2 and s["tokens_placed"] == 6

    attn = kv(n_seq_max=2)
    recr = llmem.RecurrentMemory(n_layer=2, n_embd_r=4, n_embd_s=4, mem_size=2, n_seq_max=2,
                                 layer_filter=[False, True])
    hyb = llmem.HybridMemory(attn, recr)
    decode(hyb, [0, 0, 1])
    blob = hyb.state_write()
    s = hyb.stats()
    assert set(s["parts"]) == {"attn", "recr"} and s["parts"]["recr"]["cells_used"] == 2
    assert s["parts"]["recr"]["tokens_placed"] == 3 and s["parts"]["attn"]["tokens_placed"] == 3
    assert s["state_bytes_written"] == len(blob) and s["sequences"] == 2


def test_logger_reports_no_room_refused_restores_and_k_shifts(caplog):
    cache = kv(kv_size=4, rope=Rope(n_rot=4))
    with caplog.at_level(logging.INFO, logger="llmem"):
        decode(cache, [0] * 6)
        with pytest.raises(llmem.StateError):
            cache.state_read(b"\x01\x00", 0)
        decode(cache, [0, 0])
        cache.seq_add(0, 0, -1, 1)
        cache.init_update().apply()
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "llmem"]
    assert msgs[0][0] == "WARNING" and "no room" in msgs[0][1] and "2 more free cells" in msgs[0][1]
    assert msgs[1][0] == "WARNING" and "state restore refused" in msgs[1][1] and "CORRUPT" in msgs[1][1]
    assert msgs[2][0] == "INFO" and "K-shift applied" in msgs[2][1]


def test_logger_is_silent_by_default():
    code = ("import sys, numpy as np, llmem\n"
            "print('<after import>', flush=True); print('<after import>', file=sys.stderr, flush=True)\n"
            "c = llmem.KVCache(n_layer=1, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=2)\n"
            "c.init_batch(llmem.Batch(token=np.zeros(4, np.int32)), 8)\n"
            "try:\n    c.state_read(b'xx')\nexcept llmem.StateError:\n    pass\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # (an editable install may print its rebuild while importing: only what follows counts)
    assert out.stdout.split("<after import>\n", 1)[1] == ""
    assert out.stderr.split("<after import>\n", 1)[1] == ""


def test_prometheus_example():
    pytest.importorskip("prometheus_client")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import prometheus_exporter as ex
    finally:
        sys.path.pop(0)
    from prometheus_client import CollectorRegistry

    cache = kv(kv_size=64, n_seq_max=4)
    ex.simulate(cache, steps=3)
    registry = CollectorRegistry()
    registry.register(ex.MemoryCollector({"main": cache}))
    get = registry.get_sample_value
    assert get("llmem_cells", {"memory": "main"}) == 64
    assert get("llmem_cells_used", {"memory": "main", "stream": "0"}) == 24
    assert get("llmem_sequences", {"memory": "main"}) == 4
    assert get("llmem_tokens_placed_total", {"memory": "main"}) == 24
    assert get("llmem_state_bytes_written_total", {"memory": "main"}) == cache.state_size(0)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "prometheus_exporter.py")],
                         capture_output=True, text=True, check=True)
    assert 'llmem_cells_used{memory="main",stream="0"} 44.0' in out.stdout
