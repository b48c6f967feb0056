"""``llmem demo``: the simulated server runs on every toy architecture, verifies its outputs, and
fails loudly when they are wrong."""

import io
import subprocess
import sys
import time

import numpy as np
import pytest

from llmem import cli, demo
from llmem.toy import ARCHS, ToyModel


@pytest.mark.parametrize("arch", ARCHS)
def test_demo_serves_every_client_and_verifies(arch):
    r = demo.run_demo(arch, clients=6, parallel=2, n_ctx=160, seed=7, verify=2)
    assert r.ok, r.failures
    # every history token not found in the prefix cache and every sampled token but each
    # request's last was decoded once; the system prompt once, before any request
    assert r.decoded_tokens == r.system_prompt + r.request_tokens - r.hit_tokens + r.generated_tokens - r.requests
    # the system prompt and earlier turns come from the cache
    assert r.hit_tokens >= (r.requests - 1) * min(r.system_prompt, 16) and r.requests >= r.clients
    assert r.shift.startswith("request 1 ") and r.save_restore.startswith("request 2 ")
    # the shifted and the restored request are always among the verified ones
    assert r.verified_requests >= 3 and r.verified_rows > 2 * r.verified_requests
    assert r.max_error <= demo.ATOL
    assert 0 < r.peak_cells <= r.cells and r.state_bytes > 0
    assert r.llmem_s > 0 and r.model_s > 0


def test_demo_command_prints_the_report():
    out = subprocess.run([sys.executable, "-m", "llmem.cli", "demo", "--arch", "transformer",
                          "--clients", "4", "--parallel", "2", "--ctx", "128", "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = out.stdout
    for label in ("requests", "prefix cache", "tokens", "steps", "memory used", "context shift", "save/restore",
                  "llmem work", "model compute", "verified"):
        assert f"\n{label}" in report
    assert report.splitlines()[-2].endswith("OK")
    assert "[#" not in out.stderr  # no progress bar when asked not to (and not a terminal)


def test_demo_with_no_arguments(capsys):
    t0 = time.perf_counter()
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "hybrid toy model" in out and "16 served" in out
    assert time.perf_counter() - t0 < 30


def test_a_wrong_output_fails_the_run(monkeypatch, capsys):
    real = ToyModel.forward_full

    def off_by_a_little(self, tokens, pos=None):
        return real(self, tokens, pos) + np.float32(1e-3)

    monkeypatch.setattr(ToyModel, "forward_full", off_by_a_little)
    code = cli.main(["demo", "--clients", "3", "--parallel", "2", "--ctx", "128", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in out and "MISMATCH request" in out


def test_too_small_a_context_is_refused(capsys):
    assert cli.main(["demo", "--ctx", "40", "--no-progress"]) == 2
    assert "too small" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_on_a_terminal_only():
    tty, pipe = _Terminal(), io.StringIO()
    for stream in (tty, pipe):
        bar = demo._Progress(4, stream, enabled=True)
        bar.update(2, 7)
        bar.close()
    assert tty.getvalue() == "\r[" + "#" * 15 + "." * 15 + "] 2/4 requests, step 7\n"
    assert pipe.getvalue() == ""
