"""The one image decoder: files, bytes or arrays in; pixels or a typed, per-item error out.

Everything that reads an image (dataset scans, training, calibration, the runtime, the server)
goes through :func:`decode_image`, so a file that is rejected in one place is rejected everywhere
with the same message.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from .errors import (
    CorruptImageError,
    DicomError,
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    MissingExtraError,
    UnsupportedImageError,
)
from .extras import require

log = logging.getLogger(__name__)

#: 50 megapixels: above any clinical detector (43x43 cm at 100 um is ~18.5 MP) with margin,
#: low enough that a decompression bomb cannot take gigabytes.
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MIN_SIDE = 32

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]  # noqa: UP007 (evaluated at import on 3.10)


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    min_side: int = MIN_SIDE


@dataclass
class DecodedImage:
    """Pixels as decoded: ``(H, W)`` gray or ``(H, W, 3|4)`` BGR(A), uint8 or uint16 (or float)."""

    pixels: np.ndarray
    source: str
    format: str
    bit_depth: int
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape[:2]


def _sniff_format(data: bytes) -> str | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the first SOF marker, without decoding."""
    i = 2
    n = len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return h, w
        i += 2 + length
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the first IFD's ImageLength/ImageWidth tags, without decoding.

    libtiff allocates the whole raster before reading strips, so a 10 kB deflate-compressed TIFF
    declaring 30000 x 30000 pixels would cost 0.9-1.8 GB; reading the tags first refuses it cheaply.
    """
    end = "<" if data[:2] == b"II" else ">"
    (off,) = struct.unpack(end + "I", data[4:8])
    (n,) = struct.unpack(end + "H", data[off : off + 2])
    dims = {}
    for k in range(min(n, 512)):
        e = off + 2 + 12 * k
        tag, typ = struct.unpack(end + "HH", data[e : e + 4])
        if tag in (256, 257):
            fmt = end + ("H" if typ == 3 else "I")
            dims[tag] = struct.unpack(fmt, data[e + 8 : e + 8 + struct.calcsize(fmt)])[0]
    if 256 in dims and 257 in dims:
        return dims[257], dims[256]
    return None


def _header_size(fmt: str, data: bytes) -> tuple[int, int] | None:
    """(height, width) read from the header, so huge images are refused before decoding."""
    try:
        if fmt == "png" and len(data) >= 24:
            w, h = struct.unpack(">II", data[16:24])
            return h, w
        if fmt == "bmp" and len(data) >= 26:
            if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sides
                w, h = struct.unpack("<HH", data[18:22])
            else:
                w, h = struct.unpack("<ii", data[18:26])
            return abs(h), abs(w)
        if fmt == "jpeg":
            return _jpeg_size(data)
        if fmt == "tiff":
            return _tiff_size(data)
    except struct.error:
        return None
    return None


def _check_truncation(fmt: str, data: bytes, name: str) -> None:
    # OpenCV happily returns a half-grey image for a truncated JPEG (libjpeg only warns);
    # a screening model must not see that, so check the end-of-stream markers ourselves.
    if fmt == "jpeg" and b"\xff\xd9" not in data[-4096:]:
        raise CorruptImageError(name, "JPEG is truncated (no end-of-image marker); re-export or re-send the file.")
    if fmt == "png" and b"IEND" not in data[-64:]:
        raise CorruptImageError(name, "PNG is truncated (no IEND chunk); re-export or re-send the file.")


def _check_size(h: int, w: int, name: str, limits: DecodeLimits) -> None:
    if h * w > limits.max_pixels:
        raise ImageTooLargeError(
            name,
            f"{w}x{h} = {h * w:,} pixels exceeds the limit of {limits.max_pixels:,}; "
            "down-sample it or raise max_pixels if this is a genuine study.",
        )
    if min(h, w) < limits.min_side:
        raise ImageTooSmallError(
            name, f"{w}x{h} pixels is too small for a radiograph (minimum side {limits.min_side} px)."
        )


def _check_shape(pixels: np.ndarray, name: str) -> None:
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3, 4)):
        raise UnsupportedImageError(
            name, f"array of shape {pixels.shape} is not an image; expected (H, W), (H, W, 1|3|4)."
        )


def _check_pixels(pixels: np.ndarray, name: str) -> np.ndarray:
    _check_shape(pixels, name)
    if pixels.dtype.kind == "f":
        if not np.isfinite(pixels).all():
            raise CorruptImageError(name, "float image contains NaN or infinite values.")
    elif pixels.dtype not in (np.uint8, np.uint16):
        if pixels.dtype.kind in "iub" and pixels.size and pixels.min() >= 0 and pixels.max() <= 65535:
            pixels = pixels.astype(np.uint16)
        else:
            raise UnsupportedImageError(
                name, f"pixel type {pixels.dtype} is not supported; use uint8, uint16 or float."
            )
    return pixels


def _bit_depth(pixels: np.ndarray) -> int:
    return {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(pixels.dtype, 32)


def _check_dicom_size(ds, name: str, limits: DecodeLimits) -> None:
    """Refuse by the header before pydicom decodes: an RLE-compressed DICOM of a few kB declaring
    30000 x 30000 pixels made pydicom allocate 1.8 GB before failing (found by the hardening tests)."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise DicomError(name, f"image dimensions in the header are not numbers ({exc}).") from exc
    if rows <= 0 or cols <= 0:
        raise DicomError(name, f"header declares a {cols}x{rows} image; the file is damaged.")
    _check_size(rows, cols, name, limits)
    if rows * cols * max(frames, 1) * max(samples, 1) > 4 * limits.max_pixels:
        raise ImageTooLargeError(
            name, f"{frames} frame(s) of {cols}x{rows}x{samples} samples is too much to decode; send a single-frame image."
        )


def _decode_dicom(data: bytes, name: str, limits: DecodeLimits = DecodeLimits()) -> DecodedImage:
    try:
        pydicom = require("pydicom")
    except MissingExtraError as exc:  # one item the installation cannot read: per item, never the batch
        raise DicomError(name, f"DICOM support is not installed here ({exc})") from exc
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise DicomError(name, f"not a readable DICOM file ({exc}).") from exc
    try:
        with np.errstate(all="ignore"):  # LUT arithmetic on hostile values: judged by the finite check below
            img = _dicom_pixels(ds, name, limits)
        img.pixels = _check_pixels(img.pixels, name)
        return img
    except ImageError:
        raise
    except Exception as exc:  # pydicom parses elements lazily: any access can meet a damaged one
        raise DicomError(name, f"damaged DICOM header or pixel data ({type(exc).__name__}: {exc}).") from exc


def _dicom_pixels(ds, name: str, limits: DecodeLimits) -> DecodedImage:
    if "PixelData" not in ds:
        raise DicomError(
            name, "DICOM object has no pixel data (a report or presentation state?); send the image itself."
        )
    _check_dicom_size(ds, name, limits)
    try:
        arr = ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DicomError(
            name,
            f"could not decode pixel data (transfer syntax {ts}: {exc}). Compressed DICOM needs "
            "pylibjpeg or gdcm: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg",
        ) from exc
    notes = []
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
        notes.append(f"multi-frame DICOM ({frames} frames): used the first frame")
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    out = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        out = apply_voi_lut(out, ds)
        notes.append("applied the DICOM VOI LUT / window")
    out = np.asarray(out, dtype=np.float64)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = out.max() + out.min() - out
        notes.append("inverted MONOCHROME1")
    if out.ndim == 3 and out.shape[2] == 3:  # colour DICOM arrives RGB; the rest of us speak BGR
        out = out[:, :, ::-1]
    bits = int(getattr(ds, "BitsStored", 8) or 8)
    return DecodedImage(out.astype(np.float32), name, "dicom", bits, notes)


def _read_source(source: ImageSource, name: str | None, limits: DecodeLimits) -> tuple[bytes, str]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or str(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise UnsupportedImageError(name, "file does not exist.") from None
        except OSError as exc:
            raise UnsupportedImageError(name, f"cannot read file ({exc}).") from exc
        if not path.is_file():
            raise UnsupportedImageError(name, "is not a regular file.")
        if size > limits.max_bytes:
            raise ImageTooLargeError(name, f"file is {size:,} bytes, over the {limits.max_bytes:,}-byte limit.")
        return path.read_bytes(), name
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = name or f"<{len(data)} bytes>"
        if len(data) > limits.max_bytes:
            raise ImageTooLargeError(name, f"{len(data):,} bytes is over the {limits.max_bytes:,}-byte limit.")
        return data, name
    raise UnsupportedImageError(
        name or f"<{type(source).__name__}>",
        f"cannot read an image from a {type(source).__name__}; pass a path, bytes or a NumPy array.",
    )


def jpeg_reduction(h: int, w: int, target: int | None) -> int:
    """Largest libjpeg DCT scale-down (1, 2, 4, 8) that still leaves >= 2x ``target`` pixels per side.

    A 3000 px radiograph headed for a 224 px model decodes 4-8x faster at 1/8 or 1/4 scale, and the 2x
    margin keeps the final INTER_AREA resize doing the real down-sampling.
    """
    if not target:
        return 1
    for r in (8, 4, 2):
        if min(h, w) // r >= 2 * target:
            return r
    return 1


def decode_image(
    source: ImageSource, *, name: str | None = None, limits: DecodeLimits = DecodeLimits(),
    reduce_for: int | None = None,
) -> DecodedImage:
    """Decode one image (PNG/JPEG/BMP/TIFF at 8 or 16 bit, DICOM, or a NumPy array).

    ``reduce_for``: the longest side the caller will resize to; large JPEGs are then decoded directly
    at a reduced scale (see :func:`jpeg_reduction`). Every consumer passes the model's size through
    :func:`cxr_edge.preprocess.pack_source`, so training and serving decode the same way.
    Raises a subclass of :class:`~cxr_edge.errors.ImageError` naming the item on any problem.
    """
    import cv2

    if isinstance(source, np.ndarray):
        name = name or f"<array {source.shape} {source.dtype}>"
        # shape and size first: scanning values (NaN check, range) of a 1 x 8e9 array would itself
        # allocate gigabytes (found by fuzzing: 4.3 GB RSS)
        _check_shape(source, name)
        _check_size(source.shape[0], source.shape[1], name, limits)
        pixels = _check_pixels(source, name)
        return DecodedImage(pixels, name, "array", _bit_depth(pixels))

    data, name = _read_source(source, name, limits)
    if not data:
        raise UnsupportedImageError(name, "file is empty.")
    fmt = _sniff_format(data)
    if fmt is None and name.lower().endswith((".dcm", ".dicom")):
        fmt = "dicom"
    if fmt is None:
        raise UnsupportedImageError(
            name, "not a recognised image (expected PNG, JPEG, BMP, TIFF or DICOM by content, not extension)."
        )
    if fmt == "dicom":
        img = _decode_dicom(data, name, limits)
        _check_size(img.pixels.shape[0], img.pixels.shape[1], name, limits)
        return img

    _check_truncation(fmt, data, name)
    hw = _header_size(fmt, data)
    if hw is None and fmt in ("jpeg", "png"):
        # libjpeg/libpng would find a size we could not: never decode what we could not bound
        raise CorruptImageError(name, f"{fmt.upper()} has no readable frame header; the file is damaged.")
    if hw is not None:
        if 0 in hw:
            raise CorruptImageError(name, f"{fmt.upper()} header declares a {hw[1]}x{hw[0]} image; the file is damaged.")
        _check_size(hw[0], hw[1], name, limits)
    buf = np.frombuffer(data, dtype=np.uint8)
    r = jpeg_reduction(*hw, reduce_for) if fmt == "jpeg" and hw else 1
    flag = {1: cv2.IMREAD_UNCHANGED, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[r]
    try:
        pixels = cv2.imdecode(buf, flag)
    except cv2.error as exc:
        raise CorruptImageError(name, f"{fmt.upper()} could not be decoded ({exc}).") from exc
    if pixels is None or pixels.size == 0:
        raise CorruptImageError(name, f"{fmt.upper()} data is damaged and could not be decoded.")
    pixels = _check_pixels(pixels, name)
    if r == 1:
        _check_size(pixels.shape[0], pixels.shape[1], name, limits)
    return DecodedImage(pixels, name, fmt, _bit_depth(pixels), [f"JPEG decoded at 1/{r} scale"] if r > 1 else [])
