"""One CLI vocabulary: the same flag names and value words across commands (docs/cli.md), help texts a user can
read (no doubled percent signs, no Python reprs), and usage mistakes exit 2."""

from __future__ import annotations

import argparse

import pytest

from cxr_edge.cli import build_parser, main
from cxr_edge.errors import ExitCode

#: every precision word a command accepts (docs/cli.md): what export writes, plus bf16, a CPU runtime hint
PRECISION_WORDS = {"fp32", "fp16", "bf16", "int8", "int8-trt", "int8-cpu", "int8-ov"}


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_reads_as_text(name, capsys):
    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for bad in ("%%", "('", "['", "<class", "default: ()", "default: []"):
        assert bad not in out, f"{name} --help shows {bad!r}"


def test_precision_words_are_one_set():
    for name, p in _commands().items():
        act = _option(p, "--precision")
        if act is None:
            continue
        words = set(act.choices or [])
        if not words and callable(act.type):  # comma lists: the allowed words are what the type accepts
            words = {w for w in PRECISION_WORDS if _accepts(act.type, w)}
        assert words and words <= PRECISION_WORDS, (name, words)


def _accepts(type_fn, word: str) -> bool:
    try:
        type_fn(word)
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False
    return True


def test_bench_takes_the_words_export_takes():
    cmds = _commands()
    export_words = {w for w in PRECISION_WORDS if _accepts(_option(cmds["export"], "--precision").type, w)}
    bench = _option(cmds["bench"], "--precision")
    assert bench is not None and "--precisions" in bench.option_strings  # the older spelling still works
    assert all(_accepts(bench.type, w) for w in export_words), "bench must accept every word export does (int8 too)"


def test_shared_flags_have_one_spelling():
    cmds = _commands()
    for name in ("predict", "bench"):
        assert _option(cmds[name], "--batch-size") is not None, name
    for name in ("predict", "bench", "evaluate", "calibrate", "serve"):
        assert _option(cmds[name], "--backend") is not None, name
    # DATA (labelled images) is positional wherever it is required; train keeps --data as the older spelling
    for name in ("train", "evaluate", "calibrate", "scan"):
        assert any(a.dest == "data" and not a.option_strings for a in cmds[name]._actions), name
    # the node's working folder is not "data": --workdir, with --data kept for older scripts
    node = _option(cmds["node"], "--workdir")
    assert node is not None and "--data" in node.option_strings


def test_data_given_twice_differently_is_a_usage_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "a"), "--data", str(tmp_path / "b")]) == ExitCode.USAGE
    assert "given twice" in capsys.readouterr().err
    assert main(["train"]) == ExitCode.USAGE
    assert "train needs DATA" in capsys.readouterr().err


def test_verbose_shows_the_traceback_behind_a_one_line_error(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.onnx"), str(tmp_path)]) == ExitCode.CONFIG
    assert "Traceback" not in capsys.readouterr().err
    assert main(["-v", "predict", str(tmp_path / "missing.onnx"), str(tmp_path)]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")
