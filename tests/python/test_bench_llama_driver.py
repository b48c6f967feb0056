"""The bench's driver of llama.cpp's own memory classes (bench/llama_driver.py + .cpp).

The helpers that locate and build it are tested everywhere; the driver itself only where
llama-cpp-python 0.3.36 (the ``bench`` extra), a C++ compiler and the cached sdist are present
(the CI test environment has none of them, and the tests say so when skipping): it must build,
and for a few small configurations llama.cpp's kq_mask and k indices, copied out of its graph
inputs, must equal llmem's for the same cells.
"""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import llama_driver  # noqa: E402
from bench.__main__ import check_targets, decode_plot_path, fmt_params  # noqa: E402
from bench.workloads import Config, DecodeSide  # noqa: E402

# -- helpers (no llama.cpp needed) ------------------------------------------------------------------


def test_header_members_takes_the_three_header_folders_only():
    names = [
        "llama_cpp_python-0.3.36/vendor/llama.cpp/src/llama-kv-cache.h",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/src/llama-kv-cache.cpp",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/src/models/models.h",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/include/llama.h",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/include/ggml.h",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-impl.h",
        "llama_cpp_python-0.3.36/llama_cpp/llama.py",
        "llama_cpp_python-0.3.36",
    ]
    assert llama_driver.header_members(names) == [names[0], names[3], names[4]]


def test_extract_headers_unpacks_them_once(tmp_path):
    src = tmp_path / "src"
    files = {"pkg-1/vendor/llama.cpp/src/llama-kv-cache.h": b"// kv\n",
             "pkg-1/vendor/llama.cpp/src/llama.cpp": b"// not a header\n",
             "pkg-1/vendor/llama.cpp/include/llama.h": b"// api\n"}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    sdist = tmp_path / "pkg-1.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in files:
            tar.add(src / name, arcname=name)
    dest = tmp_path / "out"
    base = llama_driver.extract_headers(sdist, dest)
    assert base == dest / "pkg-1" / "vendor" / "llama.cpp"
    assert (base / "src" / "llama-kv-cache.h").read_bytes() == b"// kv\n"
    assert (base / "include" / "llama.h").exists()
    assert not (base / "src" / "llama.cpp").exists()
    (base / "include" / "llama.h").unlink()
    llama_driver.extract_headers(sdist, dest)  # already there: nothing unpacked again
    assert not (base / "include" / "llama.h").exists()


def test_compile_command_and_stamp(tmp_path):
    source = tmp_path / "d.cpp"
    source.write_text("int x;\n")
    cmd = llama_driver.compile_command("/usr/bin/c++", source, tmp_path / "d.so", tmp_path / "inc", tmp_path / "lib")
    assert cmd[0] == "/usr/bin/c++" and "-std=c++17" in cmd and "-shared" in cmd
    assert f"-I{tmp_path / 'inc' / 'src'}" in cmd and f"-I{tmp_path / 'inc' / 'ggml/include'}" in cmd
    assert "-lllama" in cmd and f"-Wl,-rpath,{tmp_path / 'lib'}" in cmd
    stamp = llama_driver.stamp_of(cmd, source)
    assert stamp == llama_driver.stamp_of(cmd, source)
    source.write_text("int y;\n")
    assert llama_driver.stamp_of(cmd, source) != stamp
    assert llama_driver.stamp_of(cmd[:-1], source) != llama_driver.stamp_of(cmd, source)


def test_find_compiler_prefers_cxx(tmp_path):
    cxx = tmp_path / "my-c++"
    cxx.write_text("#!/bin/sh\n")
    cxx.chmod(0o755)
    assert llama_driver.find_compiler({"CXX": str(cxx)}) == str(cxx)


def test_locate_sdist_without_download_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMEM_LLAMA_SDIST", raising=False)
    path, why = llama_driver.locate_sdist(tmp_path, download=False)
    assert path is None and llama_driver.SDIST_NAME in why
    monkeypatch.setenv("LLMEM_LLAMA_SDIST", str(tmp_path / "nope.tar.gz"))
    path, why = llama_driver.locate_sdist(tmp_path, download=False)
    assert path is None and "nope.tar.gz" in why


def test_decode_plot_path_and_params():
    assert decode_plot_path("docs/bench_quick.png") == "docs/bench_quick_decode.png"
    assert decode_plot_path("out") == "out_decode.png"
    assert fmt_params({"layout": "streams", "n_cells": 1 << 20, "n_seqs": 256}) == "streams, cells 1M, seqs 256"


def _rec(workload, llmem, llama, group="decode", **params):
    return {"workload": workload, "params": params, "llmem_us": llmem, "llama_us": llama, "group": group,
            "ratio_llama": llama / llmem if llama and llmem else None, "copy_fraction": None, "extra": {},
            "host_slowdown": 1.0}


def test_targets_of_issue_13():
    recs = [_rec("decode step (1 token/seq)", 10.0, 60.0, layout="unified", n_cells=65536, n_seqs=64),
            _rec("kq_mask f32 (decode step)", 200.0, 46.0, layout="unified", n_cells=65536, n_seqs=1),
            _rec("kq_mask f32 (decode step)", None, None, layout="unified", n_cells=1 << 20, n_seqs=256)]
    out = {t["target"]: t for t in check_targets(recs)}
    assert out["decode step (1 token/seq) (unified, cells 64k, seqs 64), vs llama.cpp"]["met"] is True
    assert out["kq_mask f32 (decode step) (unified, cells 64k, seqs 1), vs llama.cpp"]["met"] is False
    assert not any("cells 1M" in k and "kq_mask" in k for k in out)  # a row not run sets no target
    # the one-call step is judged only where the tree has it
    assert out["one-call decode_step, 64 seqs, 65536 cells (us, with k/v idxs)"]["met"] is None
    recs[0]["extra"] = {"llmem_api": "decode_step, kq_mask(out=)"}
    recs[0]["llmem_us"] = 2.5
    out = {t["target"]: t for t in check_targets(recs)}
    assert out["one-call decode_step, 64 seqs, 65536 cells (us, with k/v idxs)"]["met"] is True


class _Ctx:
    def __init__(self, with_out):
        self.n_kv = 256
        self.with_out = with_out
        self.calls = []

    def kq_mask(self, causal=True, **kw):
        if "out" in kw:
            if not self.with_out:
                raise TypeError("kq_mask() got an unexpected keyword argument 'out'")
            kw["out"][...] = 0.0
            self.calls.append("out")
            return kw["out"]
        self.calls.append("alloc")
        return np.zeros((2, self.n_kv), np.float32)


@pytest.mark.parametrize("with_out", [True, False])
def test_decode_side_uses_out_where_the_tree_has_it(with_out):
    side = DecodeSide(kv=object(), seq_ids=np.arange(2, dtype=np.int32), n_ubatch=512)
    assert side.one_call is None and side.api == "init_batch+apply, -"
    ctx = _Ctx(with_out)
    first = side.mask(ctx)
    second = side.mask(ctx)
    assert first.shape == second.shape == (2, 256)
    if with_out:
        assert ctx.calls == ["out", "out"] and first is second and side.api.endswith("kq_mask(out=)")
        assert side.mask_f16(ctx).dtype == np.float16
    else:
        assert ctx.calls == ["alloc", "alloc"] and side.api.endswith("kq_mask()")
        assert side.mask_f16(ctx) is None  # no f16 row on such a tree


# -- the driver itself ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver():
    if not os.environ.get("LLMEM_LLAMA_LIB"):  # (else a llama.cpp build named by the variable)
        pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench extra) is not installed")
    pytest.importorskip("gguf", reason="gguf writes the bench's model")
    if llama_driver.find_compiler() is None:
        pytest.skip("no C++ compiler")
    if llama_driver.load(download=False) is None:  # (no network in the tests: the sdist must be cached)
        pytest.skip(f"llama.cpp driver unavailable: {llama_driver.unavailable_reason()}")
    from bench import llama_baseline

    return llama_driver.Model(llama_baseline.model_path())


@pytest.mark.parametrize("layout,n_cells,n_seqs,v_trans", [("unified", 4096, 1, False), ("unified", 4096, 4, True),
                                                           ("streams", 4096, 4, False), ("unified", 8192, 16, False)])
def test_driver_mask_equals_llmem(driver, layout, n_cells, n_seqs, v_trans):
    from bench.workloads import masks_agree, twin_caches

    cfg = Config(quick=True, use_llama=True)
    kv, lk, per_seq, note = twin_caches(layout, n_cells, n_seqs, cfg, v_trans=v_trans)
    assert lk is not None, note
    assert lk.n_stream == (1 if layout == "unified" else n_seqs)
    for s in range(n_seqs):
        assert lk.seq_pos_max(s) == kv.seq_pos_max(s) == per_seq - 1
    side = DecodeSide(kv, np.arange(n_seqs, dtype=np.int32), 512)
    ok, why = masks_agree(side, lk)
    assert ok, why
    # V indices too (with V transposed, one per value: llama.cpp's and llmem's layouts agree)
    v_mine = np.asarray(side.step().v_idxs())
    lk.decode_steps(side.seq_ids, 1, 0)
    assert np.array_equal(lk.v_idxs(), v_mine)
    assert len(v_mine) == n_seqs * (16 if v_trans else 1)
    # the mask has both kinds of entries: each token sees its own sequence's cells only
    m = lk.mask()
    assert m.shape[0] == n_seqs and np.isneginf(m).any() and (m == 0).sum() == n_seqs * (per_seq + 2)
    # a few more steps in each keep them equal; so does a removal
    for _ in range(3):
        side.step()
        lk.decode_steps(side.seq_ids, 1, 0)
    kv.seq_rm(0, per_seq - 2, -1)
    lk.seq_rm(0, per_seq - 2, -1)
    ok, why = masks_agree(side, lk)
    assert ok, why
    lk.close()


def test_driver_timings_and_recurrent(driver):
    from bench import llama_baseline
    from bench.workloads import twin_caches

    cfg = Config(quick=True, use_llama=True)
    kv, lk, per_seq, _ = twin_caches("unified", 4096, 8, cfg)
    steps = lk.decode_steps(np.arange(8, dtype=np.int32), 5, 1)
    assert steps.shape == (5,) and (steps > 0).all()
    assert all(lk.seq_pos_max(s) == per_seq + 4 for s in range(8))
    assert (lk.mask_reps(3, with_idxs=True) > 0).all()
    assert (lk.time_seq_pos_max([0, 1], 4) >= 0).all()
    assert (lk.time_seq_rm_tail([0, 1], 4, 4) > 0).all()
    assert lk.seq_pos_max(0) == per_seq + 4  # each removed tail was placed again
    with pytest.raises(RuntimeError, match="no decode step"):
        lk.mask()  # no step applied since: an error, not a read past the last micro-batch
    lk.close()
    empty = llama_driver.KV(driver, 8192, 1, n_tokens_max=4096)
    assert (empty.time_prefill(4096, 512, 2) > 0).all() and empty.seq_pos_max(0) == -1
    rs = llama_driver.Recurrent(llama_driver.Model(llama_baseline.model_path()), 4, 4)
    assert (rs.steps(np.arange(4, dtype=np.int32), 3) > 0).all()
    assert [rs.seq_pos_max(s) for s in range(4)] == [2] * 4
    with pytest.raises(RuntimeError, match="refused"):
        rs.steps(np.array([7], np.int32), 1)  # a sequence id past n_seq_max: llama.cpp's own check
