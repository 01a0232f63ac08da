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


def test_user_errors_exit_with_the_code_of_their_kind(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "missing")]) == 7  # input: the folder given cannot be used
    assert "does not exist" in capsys.readouterr().err
    assert main(["scan", str(tmp_path), "--classes", "dogs"]) == 5  # configuration: an option is wrong
    assert "Unknown class 'dogs'" in capsys.readouterr().err


def test_each_error_kind_has_its_own_exit_code(monkeypatch, capsys):
    from cxr_edge.cli import run_commands
    from cxr_edge.errors import (
        ConfigError,
        CorruptImageError,
        DatasetError,
        EngineError,
        ExitCode,
        ManifestError,
        MissingExtraError,
    )
    from cxr_edge.signing import SignatureError

    kinds = {ConfigError("bad option"): 5, MissingExtraError("pip install 'cxr-edge[serve]'"): 5,
             EngineError("cudaMalloc failed"): 4, ManifestError("sha256 differs"): 6, SignatureError("unsigned"): 6,
             DatasetError("no class folders"): 7, CorruptImageError("x.png", "truncated"): 7,
             KeyboardInterrupt(): 130}
    for exc, code in kinds.items():
        def boom(a, exc=exc):
            raise exc

        monkeypatch.setattr(run_commands, "cmd_doctor", boom)
        assert main(["doctor"]) == code, type(exc).__name__
    assert len({int(c) for c in ExitCode}) == len(ExitCode)  # no two kinds share a code
    assert "exit codes:" in build_parser().format_help() and "  6  integrity" in build_parser().format_help()
    capsys.readouterr()


@pytest.mark.parametrize("argv", [
    ["bench", "dir", "--precisions", "fp61"], ["bench", "dir", "--backends", "openvno"],
    ["bench", "dir", "--batch", "0"], ["predict", "m.onnx", "x.png", "--precision", "fp61"],
    ["predict", "m.onnx", "x.png", "--device", "gpu"], ["predict", "m.onnx", "x.png", "--backend", "onnx"],
    ["export", "m.keras", "--out", "o", "--precision", "fp61"], ["export", "m.keras", "--out", "o", "--calib-method", "kl"],
    ["train", "--data", "d", "--recipe", "resnet"], ["build", "m.onnx", "--precision", "int4"],
    ["serve", "m.onnx", "--max-batch", "-1"], ["export-triton", "m.onnx", "--out", "r", "--kind", "GPU"],
    ["evaluate", "m.keras", "d", "--split", "tset"],
])
def test_values_outside_a_fixed_set_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_cli_defaults_are_the_config_dataclasses_defaults():
    from cxr_edge.bench.runner import BenchConfig
    from cxr_edge.export.onnx_export import DEFAULT_OPSET
    from cxr_edge.export.pipeline import ExportConfig
    from cxr_edge.export.triton import TritonConfig
    from cxr_edge.serve.app import ServeConfig

    p = build_parser()
    sv = p.parse_args(["serve", "m.onnx"])
    s = ServeConfig()
    assert (sv.max_batch, sv.max_delay_ms, sv.max_queue, sv.timeout, sv.max_body_mb, sv.device, sv.body_timeout) == (
        s.max_batch, s.max_delay_ms, s.max_queue, s.timeout_s, s.max_body_mb, s.device, s.body_timeout_s)
    x = p.parse_args(["export", "m.keras", "--out", "o"])
    e = ExportConfig()
    assert (x.precision, x.int8_target, x.calib_method, x.calib_size, x.opset) == (
        e.precisions, e.int8_targets, e.calib_method, e.calib_size, e.opset)
    assert x.opset == DEFAULT_OPSET
    bn = p.parse_args(["bench", "dir"])
    b = BenchConfig()
    assert (bn.batch, bn.backends, bn.precisions, bn.budget) == (b.batches, b.backends, b.precisions, b.budget_s)
    tx = p.parse_args(["export-triton", "m.onnx", "--out", "r"])
    t = TritonConfig()
    assert (tx.max_batch, tx.preferred, tx.delay_us, tx.kind) == (t.max_batch_size, t.preferred_batch_sizes,
                                                                  t.max_queue_delay_us, t.kind)
    assert "(default: 32)" in p._subparsers._group_actions[0].choices["serve"].format_help()


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
@pytest.mark.slow  # ~25 s; the README walkthrough (slow) runs the demo end to end as well
def test_demo_runs_every_stage_small(tmp_path, monkeypatch, capsys):
    """The demo's five stages in one process, shrunk (1 epoch at 32 px, 0.05 s per bench row); the
    full-size demo runs as a subprocess in the slow test below."""
    from cxr_edge import demo

    monkeypatch.setattr(demo, "DEMO_OVERRIDES", {"epochs": 1, "learning_rate": 0.01, "image_size": 32})
    monkeypatch.setattr(demo, "DEMO_BENCH_BUDGET_S", 0.05)
    report = demo.run_demo(tmp_path / "demo", per_class=12, seed=1)
    out = capsys.readouterr().out
    assert [f"[{k}/5]" in out for k in range(1, 6)] == [True] * 5 and "Report:" in out
    assert report.is_file() and "Exported artifacts and their accuracy gates" in report.read_text()
    assert (tmp_path / "demo" / "bench" / "results.md").is_file()
    assert (tmp_path / "demo" / "artifacts" / "model.fp32.onnx").is_file()
    assert len(list((tmp_path / "demo" / "heatmaps").glob("*.gradcam.png"))) == 4 and "Heatmaps" in out


@pytest.mark.train
@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = _run("demo", "--out", str(tmp_path / "demo"), "--per-class", "40", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Report:" in out.stdout
    assert (tmp_path / "demo" / "report" / "report.md").is_file()
    assert (tmp_path / "demo" / "model" / "model.keras.manifest.json").is_file()
