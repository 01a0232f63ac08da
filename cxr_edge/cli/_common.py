"""Helpers shared by the command groups: defaults read from dataclasses, comma lists checked against choices."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any


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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


positive_int.__name__ = "positive integer"


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


non_negative_int.__name__ = "non-negative integer"


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


positive_float.__name__ = "positive number"


def csv_text(values: Iterable) -> str:
    """A tuple default shown the way the user types it: ``1,8,32``."""
    return ",".join(str(v) for v in values)


DEVICES = ("auto", "cpu", "cuda")
