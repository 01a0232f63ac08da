"""The one image decoder: files, bytes or arrays in; pixels or a typed, per-item error out.

Everything that reads an image (dataset scans, training, calibration, the runtime, the server)
goes through :func:`decode_image`, so a file that is rejected in one place is rejected everywhere
with the same message.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

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


#: decoded bytes per image (pixels x channels x bytes per sample, as the header declares them): a 49 MP
#: 16-bit RGBA PNG (392 MiB) still decodes; what would take more is refused before decoding
DEFAULT_MAX_DECODED_BYTES = 512 * 1024 * 1024
#: DICOM bytes before the pixel data: real headers are kilobytes (private tags, an icon: a few hundred kB);
#: bounded because a crafted header of millions of tiny elements makes pydicom slow and memory-hungry
#: (SECURITY.md, benchmarks/results/hostile/)
DEFAULT_MAX_DICOM_HEADER_BYTES = 2 * 1024 * 1024
#: transfer syntaxes whose data set is deflated as a whole: inflated here within ``max_bytes`` (pydicom would
#: inflate without bound before any size check: a small upload becomes gigabytes), then read as Explicit VR LE
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
#: deflated per frame (DICOM 2023): no radiography device writes it, and pydicom cannot decode it; refused
DEFLATED_TRANSFER_SYNTAXES = {"1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression"}
#: the faster decoders, each measured pixel-identical to the one it replaces on every image of the benchmark set
#: (benchmarks/decode_ceiling.py); False decodes with the reference decoders only (tests compare the two; a site
#: that doubts a result can rule the faster ones out)
FAST_DECODERS = True


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    min_side: int = MIN_SIDE
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    max_dicom_header_bytes: int = DEFAULT_MAX_DICOM_HEADER_BYTES


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
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic TIFF and BigTIFF
        return "tiff"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


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
    """Refuse by the header before pydicom decodes, because pydicom allocates the whole declared pixel array
    (gigabytes for a huge declared size) before finding that a few kB of compressed data cannot fill it."""
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


#: the pixel-data tags pydicom stops before (PixelData, FloatPixelData, DoubleFloatPixelData)
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_PIXEL_TAG_BYTES = frozenset(struct.pack(e + "HH", t >> 16, t & 0xFFFF) for t in _PIXEL_TAGS for e in "<>")


class _HeaderBudgetExceeded(Exception):
    """Raised by :class:`_BoundedStream`; pydicom may wrap it (a sequence item re-raises anything as OSError),
    so the stream's ``exceeded`` flag, not this type, is what the caller trusts."""


class _BoundedStream(io.BytesIO):
    """The file as pydicom reads it, refusing any read that would end past ``limit`` bytes.

    The header budget is then on what the parser consumes, not on where some bytes happen to sit: a
    preamble or an early private value holding the pixel-data tag bytes no longer hides a header of
    millions of elements (a byte search that found the tag in the preamble let a whole flooded header be parsed).
    The common read is one comparison in front of BytesIO's own (pydicom reads twice per element).
    """

    def __init__(self, data: bytes, limit: int):
        super().__init__(data)
        self.limit, self.exceeded, self._size = limit, False, len(data)

    def read(self, size: int | None = -1, _read=io.BytesIO.read, _tell=io.BytesIO.tell) -> bytes:
        if size is not None and size >= 0 and not self.exceeded and _tell(self) + size <= self.limit:
            return _read(self, size)
        self._admit(size)
        return _read(self, size)

    def _admit(self, size: int | None) -> None:
        pos = self.tell()
        end = self._size if size is None or size < 0 else min(self._size, pos + size)
        if self.exceeded or end > self.limit:  # a seek past the end of a small damaged file reads as its end
            self.exceeded = True  # sticky: a parser that swallows the exception meets it again on its next read
            raise _HeaderBudgetExceeded(f"read to byte {end:,} past the {self.limit:,}-byte budget")

    def read1(self, size: int | None = -1) -> bytes:
        self._admit(size)
        return super().read1(size)

    def readinto(self, buffer) -> int:
        self._admit(len(memoryview(buffer)))
        return super().readinto(buffer)

    def readline(self, size: int | None = -1) -> bytes:
        self._admit(size)
        return super().readline(size)


def _header_too_large(name: str, limits: DecodeLimits) -> DicomError:
    return DicomError(name, f"DICOM header is over the {limits.max_dicom_header_bytes:,}-byte limit before the pixel "
                            "data; strip private or overlay data first.")


def _dicom_transfer_syntax(data: bytes, name: str, limits: DecodeLimits) -> str | None:
    """The transfer syntax from the file meta group only (group 2 is never deflated), read within the header
    budget: a meta group of millions of elements was otherwise parsed in full before any check."""
    from pydicom import filereader

    fp = _BoundedStream(data, limits.max_dicom_header_bytes)
    try:
        filereader.read_preamble(fp, True)
        meta = filereader._read_file_meta_info(fp)  # public read_file_meta_info wants a path
        return str(meta.get("TransferSyntaxUID", "")) or None
    except Exception:  # no or damaged meta group: judged below by the UID search and the header parse
        if fp.exceeded:
            raise _header_too_large(name, limits) from None
        return None


def _pixel_stop():
    """A ``stop_when`` for pydicom's read_partial that stops before the first top-level pixel-data element and
    records its (VR, length) in the returned list."""
    seen: list[tuple[str | None, int]] = []

    def at_pixels(tag, vr, length) -> bool:
        if tag in _PIXEL_TAGS:
            seen.append((vr, length))
            return True
        return False

    return seen, at_pixels


def _refuse_frame_deflate(ts: str | None, data: bytes, name: str) -> None:
    """Deflated Image Frame Compression, from the meta group (or, without one, the UID near the start)."""
    head = data[: 64 * 1024]
    deflated = DEFLATED_TRANSFER_SYNTAXES.get(ts or "") or next(
        (v for k, v in DEFLATED_TRANSFER_SYNTAXES.items() if ts is None and k.encode() in head), None)
    if deflated:
        raise DicomError(name, f"transfer syntax {deflated} is not supported; send the image uncompressed or JPEG / "
                               "JPEG-LS / JPEG 2000 / RLE compressed (e.g. dcmconv +te in.dcm out.dcm).")


def inflate_deflated_dicom(data: bytes, name: str, limits: DecodeLimits = DecodeLimits()) -> bytes:
    """A Deflated Explicit VR Little Endian file as the same object in Explicit VR Little Endian, inflated in one
    bounded step: at most ``limits.max_bytes`` come out, so a deflate bomb is refused after inflating that much,
    never more. Any other file is returned unchanged."""
    import zlib

    from pydicom import filereader
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    if DEFLATED_EXPLICIT_VR_LE.encode() not in data[:64 * 1024]:
        return data
    fp = _BoundedStream(data, limits.max_dicom_header_bytes)
    try:
        preamble = filereader.read_preamble(fp, True)
        meta = filereader._read_file_meta_info(fp)
    except Exception as exc:
        if fp.exceeded:
            raise _header_too_large(name, limits) from None
        raise DicomError(name, f"not a readable DICOM file ({exc}).") from exc
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_EXPLICIT_VR_LE:
        return data
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as PS3.5 A.5 specifies
    try:
        body = inflater.decompress(data[fp.tell():], limits.max_bytes + 1)
    except zlib.error as exc:
        raise DicomError(name, f"deflated data set is damaged ({exc}).") from exc
    if len(body) > limits.max_bytes or inflater.unconsumed_tail:
        raise ImageTooLargeError(name, f"deflated data set inflates to more than {limits.max_bytes:,} bytes; "
                                       "refused (a deflate bomb, or an image far larger than a radiograph).")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(preamble or b"\0" * 128)
    out.write(b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    out.write(body)
    return out.getvalue()


@dataclass
class DicomHeader:
    """A DICOM object's data set up to its pixel values, read within the header budget: what routing and
    selection need (identifiers, modality, view) before a single pixel is decoded."""

    dataset: Any  # pydicom Dataset without the pixel values
    has_pixels: bool
    transfer_syntax: str | None  # of ``data``
    data: bytes  # the object as decoded later (a deflated one already inflated)
    declared_transfer_syntax: str | None = None  # as received (Deflated Explicit VR LE before inflation)


def read_dicom_header(data: bytes, name: str, limits: DecodeLimits = DecodeLimits()) -> DicomHeader:
    """The header of one DICOM object, with the declared image checked against the limits and the pixel data
    checked to be all there (a truncated or hostile object is refused here, by its header, before decoding).

    Raises the object's :class:`ImageError` (DicomError, ImageTooLargeError, CorruptImageError).
    """
    require("pydicom")
    from pydicom import filereader

    declared = _dicom_transfer_syntax(data, name, limits)
    data = inflate_deflated_dicom(data, name, limits)
    ts = _dicom_transfer_syntax(data, name, limits)
    _refuse_frame_deflate(ts, data, name)
    fp = _BoundedStream(data, limits.max_dicom_header_bytes)
    seen, at_pixels = _pixel_stop()

    try:
        ds = filereader.read_partial(fp, stop_when=at_pixels, force=True)
        for _ in ds.values():  # pydicom converts values lazily: a damaged one is found here, within the budget
            pass
    except Exception as exc:
        if fp.exceeded:
            raise _header_too_large(name, limits) from None
        raise DicomError(name, f"not a readable DICOM file ({exc}).") from exc
    if fp.exceeded:
        raise _header_too_large(name, limits)
    if not seen:
        return DicomHeader(ds, False, ts, data, declared)
    vr, length = seen[-1]
    if vr == "SQ" or (vr == "UN" and length == 0xFFFFFFFF):
        raise DicomError(name, f"pixel data is encoded as a sequence (VR {vr}), not as pixels; the file is damaged "
                               "or crafted. Re-export the image.")
    _check_dicom_size(ds, name, limits)
    value_at = fp.tell() + (12 if (ts and ts != "1.2.840.10008.1.2" and vr in ("OB", "OW", "OF", "OD", "UN")) else 8)
    present = len(data) - value_at
    if length == 0xFFFFFFFF:  # encapsulated: fragments end with a sequence delimiter
        if data.rfind(b"\xfe\xff\xdd\xe0", value_at) < 0:
            raise CorruptImageError(name, "compressed pixel data is truncated (no end-of-fragments delimiter); "
                                          "the transfer was cut short or the file is damaged. Send it again.")
    else:
        if length > present:
            raise CorruptImageError(name, f"pixel data is truncated: {length:,} bytes declared, {present:,} present. "
                                          "The transfer was cut short or the file is damaged; send it again.")
        needed = _native_pixel_bytes(ds)
        if needed is not None and length < needed:
            raise CorruptImageError(name, f"pixel data holds {length:,} bytes but the header's image needs {needed:,}; "
                                          "the file is damaged.")
    return DicomHeader(ds, True, ts, data, declared)


def _native_pixel_bytes(ds) -> int | None:
    """Bytes an uncompressed image of this header needs, or None when the header does not say."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except Exception:
        return None
    if bits == 1:
        return (rows * cols * frames * samples + 7) // 8
    return rows * cols * frames * samples * ((bits + 7) // 8)


def _check_dicom_structure(data: bytes, name: str, limits: DecodeLimits) -> int:
    """The offset of the pixel-data element, found by parsing the header with a bounded stream (before the
    full read, so its header part is known to be bounded), and refusals of what cannot be read in bounds.

    Deflated data sets are refused first, from the meta group alone, since pydicom inflates them before
    parsing. The header parse then stops before the first top-level pixel-data element; it must end
    *there* (an end of file, a damaged element or a stray delimiter means no pixel data to read), and a
    pixel element that pydicom would parse as a sequence (VR SQ, or UN of undefined length) is refused,
    since its items are parsed element by element, as a header would be, but after the budget.
    """
    from pydicom import filereader

    ts = _dicom_transfer_syntax(data, name, limits)
    _refuse_frame_deflate(ts, data, name)
    fp = _BoundedStream(data, limits.max_dicom_header_bytes)
    seen, at_pixels = _pixel_stop()

    try:  # values are skipped by seek (specific_tags), not read: the same walk over the same elements
        filereader.read_partial(fp, stop_when=at_pixels, force=True, specific_tags=[_PIXEL_TAGS[0]])
    except Exception as exc:  # pydicom raises many types for damaged files, and wraps ours in sequences
        if fp.exceeded:
            raise _header_too_large(name, limits) from None
        raise DicomError(name, f"not a readable DICOM file ({exc}).") from exc
    if fp.exceeded:  # swallowed somewhere and parsing ended early: still over the budget
        raise _header_too_large(name, limits)
    pos = fp.tell()
    if not seen or data[pos : pos + 4] not in _PIXEL_TAG_BYTES:
        raise DicomError(name, "DICOM object has no pixel data (a report or presentation state?); send the image itself.")
    vr, length = seen[-1]
    if vr == "SQ" or (vr == "UN" and length == 0xFFFFFFFF):
        raise DicomError(name, f"pixel data is encoded as a sequence (VR {vr}), not as pixels; the file is damaged "
                               "or crafted. Re-export the image.")
    return pos


def _decode_dicom(data: bytes, name: str, limits: DecodeLimits = DecodeLimits()) -> DecodedImage:
    try:
        require("pydicom")
    except MissingExtraError as exc:  # one item the installation cannot read: per item, never the batch
        raise DicomError(name, f"DICOM support is not installed here ({exc})") from exc
    from pydicom import filereader

    data = inflate_deflated_dicom(data, name, limits)
    pixels_at = _check_dicom_structure(data, name, limits)
    fp = io.BytesIO(data)
    # the header again (bounded: the parse above), the pixel element, and nothing after it: trailing elements
    # (signatures, padding) never change the pixels, and millions of them cost seconds to parse. pydicom asks before each
    # top-level value; the pixel value starts 8 or 12 bytes after its tag, any later element's further on.
    try:
        ds = filereader.read_partial(fp, stop_when=lambda tag, vr, length: fp.tell() > pixels_at + 12, force=True)
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


#: JPEG-LS transfer syntaxes (lossless, near-lossless): CharLS (pyjpegls) decodes them 3-4x faster than
#: pylibjpeg-libjpeg, pydicom's first plugin, with the same pixels (benchmarks/results/decode_ceiling/)
_JPEG_LS_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})


def _preferred_plugin(ds) -> str | None:
    """The pydicom decoding plugin to try first for this object, or None for pydicom's own order.

    Only a plugin measured faster *and* pixel-identical on every image of the benchmark set is named here, and only
    where it is installed; pydicom's order stays the fallback when it fails.
    """
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if not FAST_DECODERS or ts not in _JPEG_LS_SYNTAXES or not hasattr(ds, "pixel_array_options"):  # pydicom >= 3
        return None
    try:
        from pydicom.pixels.decoders.base import get_decoder

        return "pyjpegls" if "pyjpegls" in get_decoder(ts).available_plugins else None
    except Exception:  # no decoder for the syntax, or a pydicom without these internals: its own order
        return None


#: CharLS's words (2.x) for a cut or damaged JPEG-LS stream, which pylibjpeg-libjpeg decodes without a word into wrong
#: pixels; any other CharLS error (a feature it lacks, a stricter reading) falls back to pydicom's order
_CHARLS_DAMAGED = ("source buffer is too small", "general structural problem", "missing End Of Image",
                   "unexpected End Of Image")


def _dicom_array(ds, name: str) -> np.ndarray:
    """The stored pixel values, by the preferred plugin where there is one.

    Where that plugin finds the stream damaged the image is refused (CorruptImageError, as for cut pixel data);
    where it fails otherwise, pydicom's own order decodes it, so a file the reference plugins read is never refused
    for a feature the faster one lacks.
    """
    plugin = _preferred_plugin(ds)
    if plugin:
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return ds.pixel_array
        except Exception as exc:
            if any(m in str(exc) for m in _CHARLS_DAMAGED):
                said = str(exc).splitlines()[-1].split("Decoding error:")[-1].strip()
                raise CorruptImageError(name, f"JPEG-LS pixel data is damaged or cut short (CharLS: {said}); "
                                              "re-send the image.") from exc
            log.debug("pydicom plugin %s failed (%s); decoding with pydicom's own plugin order", plugin, exc)
            ds.pixel_array_options(decoding_plugin="")
    return ds.pixel_array


def _values(arr: np.ndarray, ds) -> np.ndarray:
    """Modality LUT or rescale, then VOI LUT or window, as float32: the reference arithmetic, element by element."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        # the same two functions under their pydicom 2 module (typed differently there: the redefinition is the point)
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut  # type: ignore[no-redef]
    if "ModalityLUTSequence" in ds:
        out = apply_modality_lut(arr, ds)
    else:  # rescale slope/intercept in float32, in place: pydicom's float64 doubles the peak memory
        out = arr.astype(np.float32)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1:
            out *= np.float32(slope)
        if intercept:
            out += np.float32(intercept)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        out = apply_voi_lut(out, ds)
    return np.asarray(out, dtype=np.float32)


#: integer sample types whose every value fits a lookup table (the unsigned type of the same width indexes it)
_LUT_TYPES = {np.dtype(np.uint8): np.uint8, np.dtype(np.int8): np.uint8,
              np.dtype(np.uint16): np.uint16, np.dtype(np.int16): np.uint16}


def _values_by_lut(arr: np.ndarray, ds) -> np.ndarray | None:
    """:func:`_values` as a table of every possible stored value, then one lookup per pixel: the same float32 results
    (each step is element-wise), 3-5x faster than windowing a detector-sized image in float64.

    None where a table does not pay (wider or float samples, a small image) or cannot be built; the caller then runs
    :func:`_values` on the image itself, which meets any error the table met, as before.
    """
    index = _LUT_TYPES.get(arr.dtype)
    if not FAST_DECODERS or index is None or arr.size < (1 << (8 * arr.dtype.itemsize)):
        return None
    domain = np.arange(1 << (8 * arr.dtype.itemsize), dtype=index).view(arr.dtype)  # entry k: stored value k (as bits)
    try:
        table = _values(domain, ds)
    except Exception:  # judged on the image by the reference path, which raises what it raised before
        return None
    if table.shape != domain.shape:
        return None
    return table[arr.view(index)]


def _dicom_pixels(ds, name: str, limits: DecodeLimits) -> DecodedImage:
    if "PixelData" not in ds:
        raise DicomError(
            name, "DICOM object has no pixel data (a report or presentation state?); send the image itself."
        )
    _check_dicom_size(ds, name, limits)
    try:
        arr = _dicom_array(ds, name)
    except ImageError:
        raise
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
    out = _values_by_lut(arr, ds)
    if out is None:
        out = _values(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        notes.append("applied the DICOM VOI LUT / window")
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = out.max() + out.min() - out
        notes.append("inverted MONOCHROME1")
    if out.ndim == 3 and out.shape[2] == 3:  # colour DICOM arrives RGB; the rest of us speak BGR
        out = out[:, :, ::-1]
    bits = int(getattr(ds, "BitsStored", 8) or 8)
    return DecodedImage(np.ascontiguousarray(out, dtype=np.float32), name, "dicom", bits, notes)


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

    A large radiograph headed for a small model decodes several times faster at a reduced DCT scale, and the
    2x margin keeps the final INTER_AREA resize doing the real down-sampling.
    """
    if not target:
        return 1
    for r in (8, 4, 2):
        if min(h, w) // r >= 2 * target:
            return r
    return 1


#: OpenCV flags per requested channel count: alpha is never decoded (radiographs carry an opaque one),
#: depth is kept, and orientation is ours to apply (see :func:`apply_orientation`), never OpenCV's
def _cv2_flags(channels: int | None) -> int:
    import cv2

    colour = {1: cv2.IMREAD_GRAYSCALE, 3: cv2.IMREAD_COLOR}.get(channels or 0, cv2.IMREAD_ANYCOLOR)
    return colour | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF/TIFF orientation (1-8) the way viewers do.

    One rule for every path and every scale: the orientation a JPEG, PNG (eXIf) or TIFF declares is
    applied, whether it was decoded at full or reduced scale (OpenCV applied it only to reduced-scale
    decodes, so the same file was upright or rotated depending on its size). DICOM carries no display
    transform and is never rotated.
    """
    if orientation in (2, 4):
        return np.ascontiguousarray(pixels[:, ::-1] if orientation == 2 else pixels[::-1])
    if orientation == 3:
        return np.ascontiguousarray(pixels[::-1, ::-1])
    if orientation in (5, 6, 7, 8):
        t = np.swapaxes(pixels, 0, 1)  # 5: transpose
        if orientation == 6:
            t = t[:, ::-1]  # 90 degrees clockwise
        elif orientation == 7:
            t = t[::-1, ::-1]  # transverse
        elif orientation == 8:
            t = t[::-1]  # 90 degrees counter-clockwise
        return np.ascontiguousarray(t)
    return pixels


def _orientation_probe(fmt: str) -> bytes:
    """A tiny image in ``fmt`` with orientation 3 (rotate 180) declared: bright pixel top-left as stored."""
    import zlib

    import cv2

    img = np.zeros((8, 16), np.uint8)
    img[0, 0] = 255
    if fmt == "tiff":
        import tifffile

        buf = io.BytesIO()
        tifffile.imwrite(buf, img, extratags=[(274, 3, 1, 3, True)])
        return buf.getvalue()
    exif = b"II*\x00\x08\x00\x00\x00\x01\x00" + b"\x12\x01\x03\x00\x01\x00\x00\x00\x03\x00\x00\x00" + b"\x00" * 4
    ok, enc = cv2.imencode("." + ("jpg" if fmt == "jpeg" else fmt), img)
    data = enc.tobytes()
    if fmt == "jpeg":
        seg = b"Exif\x00\x00" + exif
        return data[:2] + b"\xff\xe1" + (len(seg) + 2).to_bytes(2, "big") + seg + data[2:]
    chunk = len(exif).to_bytes(4, "big") + b"eXIf" + exif + zlib.crc32(b"eXIf" + exif).to_bytes(4, "big")
    return data[:33] + chunk + data[33:]  # after IHDR


@functools.cache
def opencv_orients(fmt: str) -> bool:
    """Whether this OpenCV build applies ``fmt``'s orientation tag itself even when told to ignore it.

    Versions differ (OpenCV 5's TIFF reader always rotates), so it is measured once, on a probe image,
    and :func:`decode_image` applies the orientation only where OpenCV did not: one rule whatever the build.
    """
    import cv2

    try:
        out = cv2.imdecode(np.frombuffer(_orientation_probe(fmt), np.uint8), _cv2_flags(1))
    except Exception:  # no encoder for the probe in this build: assume the documented behaviour
        return False
    return out is not None and out.shape == (8, 16) and int(out[-1, -1]) > int(out[0, 0])


def _decode_jpeg_strict(data: bytes, hdr, name: str, channels: int | None, r: int) -> np.ndarray | None:
    """libjpeg-turbo through simplejpeg with warnings as errors (a truncated scan with an end marker
    appended decodes as flat grey in OpenCV, which only prints libjpeg's warning). None when the file
    is outside what simplejpeg decodes (12-bit, lossless, CMYK): OpenCV decodes those."""
    if hdr.bits != 8 or hdr.jpeg_process not in (0xC0, 0xC1, 0xC2) or hdr.channels not in (1, 3):
        return None
    simplejpeg = require("simplejpeg")
    gray = channels == 1 or (channels is None and hdr.channels == 1)
    try:
        out = simplejpeg.decode_jpeg(data, "GRAY" if gray else "BGR", min_factor=r,
                                     min_height=-(-hdr.height // r), min_width=-(-hdr.width // r), strict=True)
    except ValueError as exc:
        raise CorruptImageError(name, f"JPEG data is damaged ({exc}); re-export or re-send the file.") from exc
    return out[:, :, 0] if gray else out


def _decode_png_fast(data: bytes, hdr, name: str, channels: int | None) -> np.ndarray | None:
    """A 16-bit gray PNG through imagecodecs' libpng, measured faster than OpenCV's with the same pixels on every
    image of the benchmark set (benchmarks/results/decode_ceiling/). None for every other PNG, or without imagecodecs,
    or where its output is not the plain (H, W) uint16 image (an alpha from tRNS): OpenCV decodes those.

    Runs after :func:`~cxr_edge.image_headers.png_header` has walked the chunks and inflated the image data to exactly
    its declared size, as OpenCV does; a libpng error (a bad CRC, a damaged filter byte) is the same CorruptImageError.
    """
    if not FAST_DECODERS or hdr.bits != 16 or hdr.channels != 1 or channels not in (None, 1):
        return None
    try:
        import imagecodecs
    except ImportError:
        return None
    try:
        out = imagecodecs.png_decode(data)
    except Exception as exc:  # imagecodecs.PngError (libpng's error), or a memory error
        raise CorruptImageError(name, f"PNG could not be decoded ({exc}).") from exc
    if out.dtype != np.uint16 or out.shape != (hdr.height, hdr.width):
        return None
    return out


def decode_image(
    source: ImageSource, *, name: str | None = None, limits: DecodeLimits = DecodeLimits(),
    reduce_for: int | None = None, channels: int | None = None,
) -> DecodedImage:
    """Decode one image (PNG/JPEG/BMP/TIFF at 8 or 16 bit, DICOM, or a NumPy array).

    ``reduce_for``: the longest side the caller will resize to; large JPEGs are then decoded directly
    at a reduced scale (see :func:`jpeg_reduction`). ``channels``: 1 decodes straight to gray, 3 to
    BGR, None keeps what the file has (alpha is always dropped); deciding at decode time keeps a 16-bit
    RGBA file from ever existing in memory as four wide channels. Every consumer passes the model's
    size and channels through :func:`cxr_edge.preprocess.pack_source`, so training and serving decode
    the same way. Raises a subclass of :class:`~cxr_edge.errors.ImageError` naming the item on any problem.
    """
    import cv2

    from .image_headers import check_decoded_bytes, read_header

    if isinstance(source, np.ndarray):
        name = name or f"<array {source.shape} {source.dtype}>"
        # shape and size first: scanning values (NaN check, range) of a 1 x 8e9 array would itself
        # allocate gigabytes
        _check_shape(source, name)
        _check_size(source.shape[0], source.shape[1], name, limits)
        checked = _check_pixels(source, name)
        return DecodedImage(checked, name, "array", _bit_depth(checked))

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

    def budget(h) -> None:
        _check_size(h.height, h.width, name, limits)
        check_decoded_bytes(h, name, limits.max_decoded_bytes)

    hdr = read_header(fmt, data, name, budget)
    notes = []
    r = jpeg_reduction(hdr.height, hdr.width, reduce_for) if fmt == "jpeg" else 1
    pixels = (_decode_jpeg_strict(data, hdr, name, channels, r) if fmt == "jpeg"
              else _decode_png_fast(data, hdr, name, channels) if fmt == "png" else None)
    by_opencv = pixels is None
    if by_opencv:
        r = 1  # OpenCV decodes the rare JPEG kinds at full scale
        try:
            pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _cv2_flags(channels))
        except cv2.error as exc:
            raise CorruptImageError(name, f"{fmt.upper()} could not be decoded ({exc}).") from exc
    if pixels is None or pixels.size == 0:
        raise CorruptImageError(name, f"{fmt.upper()} data is damaged and could not be decoded.")
    oriented_by_opencv = hdr.orientation != 1 and by_opencv and opencv_orients(fmt)
    expected = (hdr.width, hdr.height) if oriented_by_opencv and hdr.orientation >= 5 else (hdr.height, hdr.width)
    if r > 1:
        notes.append(f"JPEG decoded at 1/{r} scale")
    elif pixels.shape[:2] != expected:
        raise CorruptImageError(name, f"{fmt.upper()} decoded to {pixels.shape[1]}x{pixels.shape[0]}, not the "
                                      f"{expected[1]}x{expected[0]} its header declares; the file is damaged.")
    if oriented_by_opencv:
        notes.append(f"orientation {hdr.orientation} from the file's TIFF/EXIF tag (applied by OpenCV)")
    elif hdr.orientation != 1:
        pixels = apply_orientation(pixels, hdr.orientation)
        notes.append(f"applied orientation {hdr.orientation} from the file's EXIF/TIFF tag")
    pixels = _check_pixels(pixels, name)
    return DecodedImage(pixels, name, fmt, _bit_depth(pixels), notes)
