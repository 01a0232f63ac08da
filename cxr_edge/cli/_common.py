"""Helpers shared by the command groups: defaults read from dataclasses, comma lists checked against choices."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..precision import INT8_TAGS as INT8_TAGS  # re-exported: the CLI's parsers take the tags from here


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default shown in its help line (unless the help already says it, or there is none);
    epilogs (exit codes) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or "default" in text
                or action.option_strings == [] or isinstance(action, argparse.BooleanOptionalAction) and default):
            if isinstance(action, argparse.BooleanOptionalAction) and "default" not in text:
                return f"{text} (default: {'on' if default else 'off'})"
            return text
        if isinstance(default, (tuple, list, set, frozenset)):  # shown the way it is typed: fp32,fp16,int8
            return f"{text} (default: {csv_text(default).replace('%', '%%')})"
        return f"{text} (default: %(default)s)"


def default_of(cls: type, name: str) -> Any:
    """The default of dataclass field ``name``: the one place a CLI default is written."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def comma_list(choices: Iterable[str] | None = None, item: Callable[[str], Any] = str) -> Callable[[str], tuple]:
    """An argparse ``type`` for ``a,b,c``: each item converted and, with ``choices``, checked."""
    allowed = tuple(choices) if choices is not None else None

    def parse(text: str) -> tuple:
        out = []
        for raw in (t.strip() for t in text.split(",")):
            if not raw:
                continue
            if allowed is not None and raw not in allowed:
                raise argparse.ArgumentTypeError(f"{raw!r} is not one of {', '.join(allowed)}")
            try:
                out.append(item(raw))
            except ValueError as exc:
                raise argparse.ArgumentTypeError(f"{raw!r}: {exc}") from None
        if not out:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
        return tuple(out)

    parse.__name__ = "comma list"  # argparse names the type in its error messages
    return parse


def _bounded(convert, ok, rule: str, name: str):
    """An argparse type: ``convert`` the text, refuse values for which ``ok`` is false (argparse shows ``name``)."""
    def parse(text: str):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    parse.__name__ = name
    return parse


positive_int = _bounded(int, lambda v: v >= 1, ">= 1", "positive integer")
non_negative_int = _bounded(int, lambda v: v >= 0, ">= 0", "non-negative integer")
positive_float = _bounded(float, lambda v: v > 0, "> 0", "positive number")
#: a proportion such as a sensitivity: 0.95, not 95 (a usage error, exit 2, that says how to write it)
fraction = _bounded(float, lambda v: 0 < v < 1, "between 0 and 1 (write 0.95 for 95%)", "fraction")

PREPROCESS = ("auto", "cpu", "gpu")
TUNING = ("cached", "auto", "off")  # runtime.tuning.TUNING_MODES, without importing the runtime for --help


def add_engine_args(p, backends, *, device_default: str = "auto", preprocess_default: str | None = None,
                    failed_gate: str | None = None, tuning_default: str | None = None) -> None:
    """The options every command that runs an artifact shares, said once: backend, device, and optionally
    the preprocessing path and the failed-gate override (``failed_gate``: what the command does with it)."""
    p.add_argument("--backend", choices=backends, help="backend (default: the artifact format's first)")
    p.add_argument("--device", default=device_default, choices=DEVICES, help="where to run")
    if preprocess_default is not None:
        p.add_argument("--preprocess", choices=PREPROCESS, default=preprocess_default,
                       help="where images are resized: auto (the GPU only for a CUDA engine, after a self-test), cpu, gpu")
    if tuning_default is not None:
        p.add_argument("--tuning", choices=TUNING, default=tuning_default,
                       help="with no --backend: use this machine's measured fastest configuration (cxr-edge tune): "
                            "cached (if tuned here), auto (measure now if not: seconds, once), off")
    p.add_argument("--self-check", choices=SELF_CHECK, default="refuse",
                   help="at load, the engine answers the artifact's reference images and is compared with its FP32 "
                        "answers: refuse (default) an engine that drifts beyond the artifact's tolerance on this "
                        "backend/CPU, warn (run it, every result marked), off")
    if failed_gate is not None:
        p.add_argument("--allow-failed-gate", action="store_true",
                       help=f"{failed_gate} an artifact whose export accuracy gate failed "
                            "(investigation only; refused otherwise)")


def csv_text(values: Iterable) -> str:
    """A tuple default shown the way the user types it: ``1,8,32``."""
    return ",".join(str(v) for v in values)


DEVICES = ("auto", "cpu", "cuda")
SELF_CHECK = ("refuse", "warn", "off")


def new_results_dir(parent: Path, out: str | None, force: bool, what: str) -> Path:
    """A new PARENT/YYYYmmdd-HHMMSS folder by default; an --out that already holds results (results.json) is refused
    unless --force, so one run never silently replaces another's (bench, loadgen)."""
    import time

    from ..errors import ConfigError

    if out is None:
        path = parent / time.strftime("%Y%m%d-%H%M%S")
        k = 1
        while path.exists():
            path = path.with_name(f"{path.name.split('.')[0]}.{k}")
            k += 1
        return path
    path = Path(out)
    if (path / "results.json").exists() and not force:
        raise ConfigError(f"{path} already holds {what}; choose another --out or pass --force to replace them.")
    return path
