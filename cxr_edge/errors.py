"""Typed errors: each message says what was wrong, what we got, and what to do about it.

Four kinds, because each calls for a different reaction, and each has its own exit code:

- configuration (:class:`ConfigError`, :class:`MissingExtraError`): the command or its options are wrong;
  the user can fix them and run again.
- input (:class:`ImageError`, :class:`DatasetError`): an image or a data folder cannot be used. Per item
  in batches and in the service; a command exits with it only when no item could be used.
- engine (:class:`EngineError`): the machine or a library failed doing what was asked (engine build,
  CUDA, a remote server). Retrying elsewhere or fixing the installation helps; changing the command does not.
- integrity (:class:`IntegrityError`: :class:`ManifestError`, ``SignatureError``): a file does not match
  its manifest or signature. Never retried, never worked around.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """The ``cxr-edge`` exit codes (README, "Exit codes"); 2 stays argparse's usage error."""

    OK = 0
    GATE_FAILED = 1  # export/build: an artifact failed its accuracy gate (kept only with --force)
    USAGE = 2  # argparse: unknown flag, missing argument, value outside its choices
    SOME_ITEMS_FAILED = 3  # predict: some images could not be screened; the others were answered
    ENGINE = 4
    CONFIG = 5
    INTEGRITY = 6
    INPUT = 7
    INTERRUPTED = 130  # Ctrl-C


class CxrEdgeError(Exception):
    """Base class of every error cxr-edge raises on purpose."""

    exit_code: ExitCode = ExitCode.CONFIG


class MissingExtraError(CxrEdgeError, ImportError):
    """An optional dependency is missing; the message names the extra that provides it."""

    exit_code = ExitCode.CONFIG


class InputError(CxrEdgeError, ValueError):
    """Input the user gave (an image, a data folder) cannot be used."""

    exit_code = ExitCode.INPUT


class IntegrityError(CxrEdgeError, ValueError):
    """A file does not match its manifest, hash or signature: refused, never worked around."""

    exit_code = ExitCode.INTEGRITY


class ImageError(InputError):
    """One image could not be used. ``source`` names it so batch reports can say which."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")

    def __reduce__(self):  # survives pickling (worker processes): rebuilt from (source, reason)
        return type(self), (self.source, self.reason)


class UnsupportedImageError(ImageError):
    """Not an image format we read (or an empty file)."""


class CorruptImageError(ImageError):
    """Looks like a supported format but is damaged or truncated."""


class ImageTooLargeError(ImageError):
    """Bigger than the configured pixel or byte limit (decompression-bomb guard)."""


class ImageTooSmallError(ImageError):
    """Too few pixels to be a radiograph."""


class DicomError(ImageError):
    """A DICOM object we cannot turn into pixels (no pixel data, unsupported compression...)."""


class DatasetError(InputError):
    """A data directory we cannot use as a dataset."""


class ManifestError(IntegrityError):
    """A manifest that is missing, malformed, or does not match its artifact."""


class ConfigError(CxrEdgeError, ValueError):
    """An invalid option or combination of options."""

    exit_code = ExitCode.CONFIG


class EngineError(CxrEdgeError, RuntimeError):
    """An engine failed while building or running (TensorRT build, CUDA call, device): not the user's options.

    Kept apart from :class:`ConfigError` so callers (and the CLI's exit code) can tell "your command is
    wrong" from "the machine or library failed doing what was asked".
    """

    exit_code = ExitCode.ENGINE


class UsageError(ConfigError):
    """The command line itself is wrong (a flag given twice in two spellings, a missing argument argparse cannot
    see): exit 2, like argparse's own usage errors."""

    exit_code = ExitCode.USAGE
