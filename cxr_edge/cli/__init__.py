"""The ``cxr-edge`` command line: one parser module per command group, one exit code per error kind.

Each group module (``model_commands``, ``run_commands``, ``serve_commands``, ``data_commands``,
``trust_commands``) adds its sub-commands and their handlers. Defaults come from the config
dataclasses the handlers build (via :func:`_common.default_of`), so a default is written once; flags
whose set is fixed use ``choices=`` so a typo is a usage error, not a silently ignored value.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from ..errors import CxrEdgeError, ExitCode
from . import (
    bench_commands,
    bundle_commands,
    data_commands,
    loadgen_commands,
    model_commands,
    node_commands,
    run_commands,
    serve_commands,
    trust_commands,
)
from ._common import HelpFormatter

GROUPS = (model_commands, run_commands, bench_commands, loadgen_commands, serve_commands, node_commands, data_commands,
          trust_commands, bundle_commands)

EXIT_CODES = "\n".join(f"  {c.value:3d}  {doc}" for c, doc in (
    (ExitCode.OK, "success"),
    (ExitCode.GATE_FAILED, "an artifact or engine failed its accuracy gate (export, build)"),
    (ExitCode.USAGE, "usage error: unknown flag, missing argument, value outside its choices"),
    (ExitCode.SOME_ITEMS_FAILED, "predict: some images could not be screened; the others were answered"),
    (ExitCode.ENGINE, "the machine or a library failed: engine build, CUDA, remote server"),
    (ExitCode.CONFIG, "configuration: an option, combination or missing extra the command names"),
    (ExitCode.INTEGRITY, "integrity: a file does not match its manifest, hash or signature"),
    (ExitCode.INPUT, "input: no image or data folder given could be used"),
    (ExitCode.INTERRUPTED, "interrupted (Ctrl-C)"),
))


def _quiet_tensorflow(verbose: bool = False) -> None:
    """Third-party chatter off by default (TensorFlow's native start-up lines, absl, oneDNN notices; see
    extras.require); ``-v`` shows it again."""
    if verbose:
        os.environ.setdefault("CXR_EDGE_VERBOSE_TF", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        for name in ("absl", "tensorflow", "tf2onnx", "h5py", "matplotlib", "PIL", "onnxruntime"):
            logging.getLogger(name).setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-edge", description="Chest X-ray screening: train, evaluate, export, run.",
                                epilog="exit codes:\n" + EXIT_CODES, formatter_class=HelpFormatter)
    from .. import __version__

    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"cxr-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_tensorflow(args.verbose)
    try:
        from .preflight import resolve_args

        if args.command != "bundle":  # bundle reports on incomplete bundles itself
            resolve_args(args)
        code = args.func(args)
    except CxrEdgeError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    return int(code or ExitCode.OK)
