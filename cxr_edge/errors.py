"""Typed errors: each message says what was wrong, what we got, and what to do about it."""

from __future__ import annotations


class CxrEdgeError(Exception):
    """Base class of every error cxr-edge raises on purpose."""


class MissingExtraError(CxrEdgeError, ImportError):
    """An optional dependency is missing; the message names the extra that provides it."""


class ImageError(CxrEdgeError, ValueError):
    """One image could not be used. ``source`` names it so batch reports can say which."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


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


class DatasetError(CxrEdgeError, ValueError):
    """A data directory we cannot use as a dataset."""


class ManifestError(CxrEdgeError, ValueError):
    """A manifest that is missing, malformed, or does not match its artifact."""


class ConfigError(CxrEdgeError, ValueError):
    """An invalid option or combination of options."""


class EngineError(CxrEdgeError, RuntimeError):
    """An engine failed while building or running (TensorRT build, CUDA call, device): not the user's options.

    Kept apart from :class:`ConfigError` so callers (and the CLI's exit code) can tell "your command is
    wrong" from "the machine or library failed doing what was asked".
    """
