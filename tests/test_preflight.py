"""Start-up failures of the long-running commands are one line and the right exit code, before anything starts."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from cxr_edge.cli import main
from cxr_edge.errors import ConfigError, ExitCode


@pytest.fixture(scope="module")
def artifact(tiny_export) -> Path:
    return Path(next(a.path for a in tiny_export.artifacts if a.variant == "int8-cpu"))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("command", ["serve", "node"])
def test_a_wrong_path_is_one_line_exit_5(command, tmp_path, capsys):
    extra = ["--data", str(tmp_path / "d"), "--allow-any-caller"] if command == "node" else []
    assert main([command, str(tmp_path / "missing.onnx"), *extra]) == ExitCode.CONFIG
    assert "does not exist" in _one_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main([command, str(tmp_path / "empty"), *extra]) == ExitCode.CONFIG
    assert "folder with no artifact" in _one_line(capsys)


def test_an_artifact_copied_without_its_pieces_names_the_missing_one(artifact, tmp_path, capsys):
    from cxr_edge.cli import preflight

    kiosk = tmp_path / "kiosk"
    kiosk.mkdir()
    for f in (artifact, artifact.with_name(artifact.name + ".manifest.json")):
        shutil.copy(f, kiosk / f.name)
    assert main(["serve", str(kiosk / artifact.name)]) == ExitCode.INTEGRITY
    line = _one_line(capsys)
    assert "head" in line and "copy the bundle folder" in line
    only_model = tmp_path / "bare"
    only_model.mkdir()
    shutil.copy(artifact, only_model / artifact.name)
    assert main(["serve", str(only_model / artifact.name)]) == ExitCode.INTEGRITY
    assert "has no manifest" in _one_line(capsys)
    # with its head, the copied folder is a complete artifact, and the folder stands for the one artifact in it
    shutil.copy(artifact.with_name("model.head.npz"), kiosk / "model.head.npz")
    assert preflight.artifact(str(kiosk)) == str(kiosk / artifact.name)
    # the export folder holds several: the folder alone is refused, naming them
    assert len(list(artifact.parent.glob("*.onnx.manifest.json"))) > 1
    with pytest.raises(ConfigError, match="give one of them"):
        preflight.artifact(str(artifact.parent))


def test_a_busy_port_is_refused_before_the_engine_loads(artifact, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["serve", str(artifact), "--port", str(port)]) == ExitCode.CONFIG
        assert f"127.0.0.1:{port} cannot be used" in _one_line(capsys)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("cxr-edge ")


@pytest.mark.parametrize("command", [["calibrate", "a.onnx", "data"], ["train", "--data", "d", "--out", "o"]])
def test_a_sensitivity_given_in_percent_is_a_usage_error_that_says_how_to_write_it(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--target-sensitivity", "95"])
    assert e.value.code == ExitCode.USAGE
    assert "write 0.95 for 95%" in capsys.readouterr().err


def test_help_texts_show_no_doubled_percent_signs(capsys):
    for command in ("calibrate", "serve", "node", "predict", "bench", "export", "train"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "%%" not in out, command
