import subprocess
import sys

import llmem
from llmem import cli


def test_version_flag(capsys):
    try:
        cli.main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert capsys.readouterr().out.strip() == f"llmem {llmem.__version__}"


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "llmem.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"llmem {llmem.__version__}"


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "usage: llmem" in capsys.readouterr().out
