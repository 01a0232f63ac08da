"""The command line and the README's promises."""

import re
import subprocess
import sys

import pytest
from conftest import REPO

from cxr_edge.cli import build_parser, main


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cxr_edge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_help_lists_commands():
    text = build_parser().format_help()
    for cmd in ("demo", "train", "evaluate", "synth", "scan", "recipes"):
        assert cmd in text


def test_synth_and_scan(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "d"), "--per-class", "5"]) == 0
    (tmp_path / "d" / "COVID" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    assert main(["scan", str(tmp_path / "d"), "--classes", "COVID,Normal", "--decode"]) == 0
    out = capsys.readouterr().out
    assert "classes {'COVID': 6, 'Normal': 5}" in out
    assert "Viral Pneumonia: class 'Viral Pneumonia' is not used" in out
    assert "1 bad" in out and "broken.png" in out


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["scan", str(tmp_path), "--classes", "dogs"]) == 2
    assert "Unknown class 'dogs'" in capsys.readouterr().err


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    demo, test = blocks[0].strip(), blocks[1].strip()
    assert "\n" not in demo and "\n" not in test, "each set-up command must be a single line"
    assert demo.endswith("cxr-edge demo") and "pip install" in demo
    assert "pytest" in test and "pip install" in test
    ci = (REPO / ".ci" / "run").read_text()
    assert "README.md" in ci  # .ci/run extracts and runs the README's own test line


@pytest.mark.train
@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = _run("demo", "--out", str(tmp_path / "demo"), "--per-class", "40", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Report:" in out.stdout
    assert (tmp_path / "demo" / "report" / "report.md").is_file()
    assert (tmp_path / "demo" / "model" / "model.keras.manifest.json").is_file()
