"""``llmem plan``: the table and the JSON output."""

import json
import subprocess
import sys

import pytest

from gguf_models import write_gguf, write_metadata
from llmem import cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_text_kv(tmp_path, capsys):
    path = write_gguf(tmp_path, "llama32_1b")
    code, out, _ = run(capsys, "plan", str(path), "--ctx", "8192", "--parallel", "1", "--table", "-kvu")
    assert code == 0
    assert "llama, 16 layers -> kv memory" in out
    assert "n_ctx 8192, n_ctx_seq 8192, 1 seq(s), unified" in out
    rows = [line.split() for line in out.splitlines()]
    assert ["kv", "K", "f16", "8192", "1", "16", "128.00"] in rows
    assert ["kv", "V", "f16", "8192", "1", "16", "128.00"] in rows
    assert ["total", "256.00"] in rows


def test_plan_text_iswa_and_options(tmp_path, capsys):
    path = write_gguf(tmp_path, "gemma3_1b")
    code, out, _ = run(capsys, "plan", str(path), "--ctx", "32768", "--parallel", "2",
                       "--no-unified", "--type-k", "f32", "--ubatch", "256", "--flash-attn", "--table")
    assert code == 0
    assert "one stream per seq" in out and "v_trans 0" in out
    rows = [line.split() for line in out.splitlines()]
    # 4 global layers x 16384 cells x 256 x 2 streams x 4 bytes = 128 MiB
    assert ["kv_base", "K", "f32", "16384", "2", "4", "128.00"] in rows
    # SWA: pad256(min(16384, 512 + 256)) = 768 cells, 22 layers, 2 streams, f16 V
    assert ["kv_swa", "(swa", "512)", "V", "f16", "768", "2", "22", "16.50"] in rows


def test_plan_swa_full(tmp_path, capsys):
    path = write_gguf(tmp_path, "gemma3_1b")
    _, out, _ = run(capsys, "plan", str(path), "--ctx", "4096", "--swa-full", "--json")
    d = json.loads(out)
    assert [c["cells"] for c in d["components"]] == [4096, 4096] and d["can_shift"] is True


def test_plan_json_hybrid(tmp_path, capsys):
    path = write_gguf(tmp_path, "jamba_v01")
    code, out, _ = run(capsys, "plan", str(path), "--ctx", "4096", "--parallel", "3", "-kvu", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["arch"] == "jamba" and d["kind"] == "hybrid" and d["n_seq_max"] == 3
    kv, rs = d["components"]
    assert kv["name"] == "kv" and kv["layers"] == [4, 12, 20, 28] and kv["cells"] == 4096
    assert rs["name"] == "recurrent" and rs["cells"] == 3 and rs["n_layers"] == 28
    assert {b["name"]: b["bytes"] for b in rs["buffers"]} == {
        "R": 28 * 3 * 8192 * 3 * 4, "S": 28 * 16 * 8192 * 3 * 4}
    assert d["total_bytes"] == kv["bytes"] + rs["bytes"]
    assert d["log"][0].startswith("llama_kv_cache: size =")
    assert d["log"][1].startswith("llama_memory_recurrent: size =")


def test_plan_types_for_recurrent_state(tmp_path, capsys):
    path = write_gguf(tmp_path, "mamba_130m")
    _, out, _ = run(capsys, "plan", str(path), "--ctx", "1024", "--type-r", "f16",
                    "--type-s", "bf16", "--json")
    bufs = json.loads(out)["components"][0]["buffers"]
    assert [(b["name"], b["dtype"], b["bytes"]) for b in bufs] == [
        ("R", "f16", 24 * 4608 * 2), ("S", "bf16", 24 * 24576 * 2)]


def test_plan_errors(tmp_path, capsys):
    path = write_metadata(tmp_path / "bert.gguf", "bert",
                          {"context_length": 512, "embedding_length": 384, "block_count": 6})
    code, out, err = run(capsys, "plan", str(path))
    assert code == 2 and out == "" and "unsupported model architecture 'bert'" in err
    code, _, err = run(capsys, "plan", str(tmp_path / "none.gguf"))
    assert code == 2 and "no such GGUF file" in err
    code, _, err = run(capsys, "plan", str(write_gguf(tmp_path, "llama32_1b")), "--type-k", "q3_k")
    assert code == 2 and "type_k" in err
    missing = write_gguf(tmp_path, "mamba2_130m", drop=("ssm.inner_size",))
    code, _, err = run(capsys, "plan", str(missing))
    assert code == 2 and "mamba2.ssm.inner_size" in err


def test_plan_needs_a_model(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan"])
    assert exc.value.code == 2


def test_plan_console_entry(tmp_path):
    path = write_gguf(tmp_path, "lfm2_350m")
    out = subprocess.run([sys.executable, "-m", "llmem.cli", "plan", str(path), "--ctx", "2048",
                          "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["kind"] == "hybrid"


def test_plan_default_output_is_llama_cpp_log_lines(tmp_path, capsys):
    path = write_gguf(tmp_path, "llama32_1b")
    code, out, _ = run(capsys, "plan", str(path), "-c", "8192", "-np", "2", "-kvu")
    assert code == 0
    lines = out.splitlines()
    assert "llama_context: n_ctx         = 8192" in lines
    assert "llama_context: n_seq_max     = 2" in lines
    assert "llama_context: kv_unified    = true" in lines
    assert lines[-1] == ("llama_kv_cache: size =  256.00 MiB (  8192 cells,  16 layers,  2/1 seqs), "
                         "K (f16):  128.00 MiB, V (f16):  128.00 MiB")


def test_plan_takes_llama_cpp_flags(tmp_path, capsys):
    path = str(write_gguf(tmp_path, "gemma3_1b"))
    short = run(capsys, "plan", path, "-c", "32768", "-np", "2", "-ctk", "f32", "-ctv", "f16",
                "-ub", "256", "-b", "1024", "-fa", "on", "--swa-full", "--json")
    long_ = run(capsys, "plan", path, "--ctx-size", "32768", "--parallel", "2", "--cache-type-k", "f32",
                "--cache-type-v", "f16", "--ubatch-size", "256", "--batch-size", "1024", "--flash-attn", "on",
                "--swa-full", "--json")
    assert short == long_ and short[0] == 0
    d = json.loads(short[1])
    assert d["n_ubatch"] == 256 and d["n_batch"] == 1024 and d["v_trans"] is False
    assert d["unified"] is False  # llama.cpp's default: one stream per sequence without -kvu
    assert [c["buffers"][0]["dtype"] for c in d["components"]] == ["f32", "f32"]
    # -fa off transposes V; auto counts as on
    assert json.loads(run(capsys, "plan", path, "-fa", "off", "--json")[1])["v_trans"] is True
    assert json.loads(run(capsys, "plan", path, "-fa", "auto", "--json")[1])["v_trans"] is False


def test_plan_without_gguf_names_the_extra(tmp_path, capsys, monkeypatch):
    path = write_gguf(tmp_path, "llama32_1b")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as on a plain install
    code, out, err = run(capsys, "plan", str(path))
    assert code == 2 and out == ""
    assert "pip install llmem[gguf]" in err and "Traceback" not in err
