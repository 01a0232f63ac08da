"""Each sub-command's parser is built by one function of its group, and the precision choices the CLI and the
benchmark offer come from the core enums yet read exactly as users type them."""

import argparse
import json

import pytest

from cxr_edge.cli import GROUPS, build_parser


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__.rsplit(".", 1)[-1])
def test_each_command_has_its_own_parser_function(group):
    names = [n for n in _commands(build_parser()) if f"_add_{n.replace('-', '_')}_parser" in vars(group)]
    assert names, group.__name__
    for name in names:
        p = argparse.ArgumentParser()
        group_fn = vars(group)[f"_add_{name.replace('-', '_')}_parser"]
        group_fn(p.add_subparsers())
        assert list(_commands(p)) == [name]  # that function adds exactly its command


def test_every_command_is_built_by_a_parser_function():
    built = {n for g in GROUPS for n in _commands(build_parser()) if f"_add_{n.replace('-', '_')}_parser" in vars(g)}
    assert built == set(_commands(build_parser()))


def test_precision_choices_read_as_users_type_them():
    from cxr_edge.bench.runner import BENCH_PRECISIONS, BenchConfig
    from cxr_edge.cli.model_commands import ENGINE_PRECISIONS, EXPORT_PRECISIONS, INT8_TARGETS
    from cxr_edge.cli.run_commands import OPENVINO_PRECISIONS

    assert EXPORT_PRECISIONS == ("fp32", "fp16", "int8", "int8-trt", "int8-cpu", "int8-ov")
    assert ENGINE_PRECISIONS == ("fp32", "fp16", "int8") and INT8_TARGETS == ("trt", "cpu", "ov")
    assert BENCH_PRECISIONS == BenchConfig().precisions == ("fp32", "fp16", "bf16", "int8-trt", "int8-cpu", "int8-ov")
    assert OPENVINO_PRECISIONS == ("fp32", "bf16")
    for values in (EXPORT_PRECISIONS, INT8_TARGETS, BENCH_PRECISIONS, OPENVINO_PRECISIONS):
        assert all(type(v) is str for v in values)  # not enum members: f"{Precision.FP32}" reads "Precision.FP32"
    args = build_parser().parse_args(["bench", "out"])
    assert args.precisions == BENCH_PRECISIONS  # the default, shown as fp32,fp16,... in --help, parsed back
    assert json.dumps(BenchConfig().__dict__["precisions"]) == json.dumps(list(BENCH_PRECISIONS))
