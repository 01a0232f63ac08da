"""The faster decoders chosen in decode.py (issue 32; benchmarks/decode_ceiling.py): the same pixels as the reference
decoders they replace, and the same typed errors for damaged input, on synthetic images."""

from __future__ import annotations

import importlib.util
import io
import struct
import sys
import warnings
import zlib
from contextlib import contextmanager

import cv2
import numpy as np
import pytest
from conftest import HAS_PYDICOM, cxr_like

from cxr_edge import decode, image_headers
from cxr_edge.decode import decode_image
from cxr_edge.errors import ImageError

HAS_IMAGECODECS = importlib.util.find_spec("imagecodecs") is not None
needs_imagecodecs = pytest.mark.skipif(not HAS_IMAGECODECS, reason="imagecodecs not installed")
needs_pydicom = pytest.mark.skipif(not HAS_PYDICOM, reason="pydicom not installed (cxr-edge[dicom])")
JPEG_LS, JPEG_LS_NEAR, J2K_LOSSLESS = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90"


@contextmanager
def reference_decoders():
    """The decoders as they were before the choice: OpenCV for PNG, zlib's streaming check, pydicom's plugin order
    and its float64 windowing of every pixel."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode, "FAST_DECODERS", False)
        mp.setattr(image_headers, "ONE_SHOT_INFLATE_MAX", 0)
        yield


def _outcome(data: bytes, **kw):
    """What decode_image makes of ``data``: ("ok", pixels, notes, bit depth) or (error type, message)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on float VOI input: the same in both paths
        try:
            img = decode_image(data, name="x", **kw)
        except ImageError as exc:
            return type(exc).__name__, str(exc)
    return "ok", img.pixels, img.notes, img.bit_depth


def _same(data: bytes, *, messages: bool = True, **kw):
    """Both outcomes, asserted equal (pixels exactly, dtype and shape included); returns the faster path's."""
    fast = _outcome(data, **kw)
    with reference_decoders():
        ref = _outcome(data, **kw)
    assert fast[0] == ref[0], (fast[:2], ref[:2])
    if fast[0] == "ok":
        assert fast[1].dtype == ref[1].dtype and fast[1].shape == ref[1].shape
        assert np.array_equal(fast[1], ref[1]), float(np.abs(fast[1].astype(float) - ref[1]).max())
        assert fast[2:] == ref[2:]
    elif messages:
        assert fast[1] == ref[1]
    return fast


# ---------------------------------------------------------------------------------------------------- PNG

def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png16(a: np.ndarray, extra: tuple = (), interlace: bool = False, stream: bytes | None = None) -> bytes:
    """A 16-bit gray PNG written by hand (filter 0 rows; Adam7 when ``interlace``), with ``extra`` chunks before
    the image data, or ``stream`` as the image data."""
    def rows(img):
        return b"".join(b"\x00" + img[r].astype(">u2").tobytes() for r in range(img.shape[0]))

    raw = b"".join(rows(a[y0::dy, x0::dx]) for x0, y0, dx, dy in _ADAM7 if a[y0::dy, x0::dx].size) if interlace else rows(a)
    h, w = a.shape
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(_chunk(k, v) for k, v in extra)
            + _chunk(b"IDAT", zlib.compress(raw, 6) if stream is None else stream) + _chunk(b"IEND", b""))


def _exif(orientation: int) -> bytes:
    return b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHII", 274, 3, 1, orientation) + b"\x00" * 4


def _img12(h: int = 90, w: int = 130, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    big = cv2.resize(cxr_like(96, 96, seed), (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32) * 16
    return np.clip(big + rng.normal(0, 8, big.shape), 0, 4095).astype(np.uint16)


@needs_imagecodecs
@pytest.mark.parametrize("channels", [None, 1, 3])
@pytest.mark.parametrize("variant", ["opencv", "plain", "interlaced", "sBIT", "gAMA+sRGB+bKGD", "exif6", "full-range"])
def test_png16_same_pixels_as_opencv(variant, channels):
    a = _img12(70, 101, seed=3)
    if variant == "full-range":
        a = np.random.default_rng(1).integers(0, 65536, a.shape).astype(np.uint16)
    data = {
        "opencv": lambda: cv2.imencode(".png", a)[1].tobytes(),  # OpenCV's own filters and compression
        "plain": lambda: _png16(a),
        "full-range": lambda: _png16(a),
        "interlaced": lambda: _png16(a, interlace=True),
        "sBIT": lambda: _png16(a, ((b"sBIT", b"\x0c"),)),  # 12 significant bits: libpng must not shift
        "gAMA+sRGB+bKGD": lambda: _png16(a, ((b"gAMA", struct.pack(">I", 45455)), (b"sRGB", b"\x00"),
                                              (b"bKGD", struct.pack(">H", 7)))),
        "exif6": lambda: _png16(a, ((b"eXIf", _exif(6)),)),
    }[variant]()
    out = _same(data, channels=channels)
    assert out[0] == "ok"
    if channels != 3:  # the faster decoder ran (a colour request stays with OpenCV)
        hdr = image_headers.read_header("png", data, "x")
        assert decode._decode_png_fast(data, hdr, "x", channels) is not None
        assert out[1].dtype == np.uint16


@needs_imagecodecs
def test_png_kinds_left_to_opencv_decode_as_before():
    a = _img12(64, 80)
    a8 = (a >> 4).astype(np.uint8)
    trns = _png16(a, ((b"tRNS", struct.pack(">H", int(a[0, 0]))),))  # imagecodecs would add an alpha: OpenCV's
    for data in (trns, cv2.imencode(".png", a8)[1].tobytes(), cv2.imencode(".png", cv2.merge([a, a, a]))[1].tobytes()):
        hdr = image_headers.read_header("png", data, "x")
        assert data is trns or decode._decode_png_fast(data, hdr, "x", None) is None
        assert _same(data)[0] == "ok"


@needs_imagecodecs
def test_png_damage_raises_the_same_typed_errors():
    a = _img12(64, 96)
    good = _png16(a)
    idat = good.index(b"IDAT")
    raw_rows = b"".join(b"\x00" + a[r].astype(">u2").tobytes() for r in range(a.shape[0]))
    bad_filter = raw_rows[:10 * 193] + b"\x07" + raw_rows[10 * 193 + 1:]  # a filter type that does not exist
    stream = zlib.compress(raw_rows, 6)
    cinfo0 = bytes([0x08, (31 - (0x08 << 8) % 31) % 31]) + stream[2:]  # a 256-byte window declared, 32 KiB used
    cases = {
        "cut in the image data": (good[: idat + 200], True),
        "cut before IEND": (good[:-12], True),
        "bad IDAT CRC": (good[: idat + 10] + bytes([good[idat + 10] ^ 0xFF]) + good[idat + 11:], False),
        "stream cut short": (_png16(a, stream=stream[: len(stream) // 2]), True),
        "bad Adler-32": (_png16(a, stream=stream[:-1] + bytes([stream[-1] ^ 1])), True),
        "more data than the header": (_png16(a, stream=zlib.compress(raw_rows + b"\0" * 5000)), True),
        "window smaller than used": (_png16(a, stream=cinfo0), False),  # zlib passes it; libpng refuses it
        "bad filter byte": (_png16(a, stream=zlib.compress(bad_filter)), False),
    }
    for what, (data, same_message) in cases.items():
        out = _same(data, messages=same_message)
        assert out[0] == "CorruptImageError", (what, out[:2])


@needs_imagecodecs
@pytest.mark.parametrize("case", ["exact", "short", "long", "cut", "adler", "cinfo0", "trailing", "split", "fdict"])
def test_png_structure_check_verdicts_unchanged(case):
    raw = bytes(np.random.default_rng(0).integers(0, 40, 200_000, dtype=np.uint8)) + b"\0" * 100_000
    stream = zlib.compress(raw, 6)
    pieces = {
        "exact": [stream], "short": [zlib.compress(raw[:-1])], "long": [zlib.compress(raw + b"x")],
        "cut": [stream[:-100]], "adler": [stream[:-1] + bytes([stream[-1] ^ 1])], "trailing": [stream + b"junk"],
        "cinfo0": [bytes([0x08, (31 - (0x08 << 8) % 31) % 31]) + stream[2:]],
        "split": [stream[:1000], stream[1000:5000], stream[5000:]],
        "fdict": [bytes([0x78, 0xBB]) + b"\0\0\0\1" + stream[2:]],
    }[case]
    views = [memoryview(p) for p in pieces]
    fast = image_headers._inflated_size(views, len(raw))
    with reference_decoders():
        ref = image_headers._inflated_size(views, len(raw))
    assert fast == ref
    assert image_headers._inflates_exactly(views, len(raw)) == (case in ("exact", "trailing", "split"))


@needs_imagecodecs
def test_without_imagecodecs_png_decodes_as_before(monkeypatch):
    data = _png16(_img12())
    fast = _outcome(data)
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # import imagecodecs raises ImportError
    assert not image_headers._inflates_exactly([memoryview(data)], 10)
    hdr = image_headers.read_header("png", data, "x")
    assert decode._decode_png_fast(data, hdr, "x", None) is None
    assert np.array_equal(_outcome(data)[1], fast[1])


# ---------------------------------------------------------------------------------------------------- DICOM

def _dicom(pixels: np.ndarray, syntax: str | None = None, *, bits: int = 16, stored: int = 12, signed: bool = False,
           encode: dict | None = None, **attrs) -> bytes:
    """A DX object holding ``pixels`` (frames first when 3-D), compressed to ``syntax`` by pydicom's encoders."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "P1"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, int(signed)
    for k, v in attrs.items():
        setattr(ds, k, v)
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}[bits, signed]
    ds.PixelData = pixels.astype(dtype).tobytes()
    if syntax is not None:
        plugin = "pyjpegls" if syntax.startswith("1.2.840.10008.1.2.4.8") else "pylibjpeg"
        ds.compress(syntax, encoding_plugin=plugin, generate_instance_uid=False, **(encode or {}))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _lut_item(n: int, first: int, depth: int, values: np.ndarray):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.add_new(0x00283002, "US", [n, first, depth])  # LUT Descriptor
    item.add_new(0x00283006, "OW", np.asarray(values).astype("<u2").tobytes())  # LUT Data
    return item


def _header_cases() -> dict:
    from pydicom.sequence import Sequence

    ramp = np.linspace(0, 65535, 4096).astype(np.uint16)
    return {
        "window": {"WindowCenter": "2048", "WindowWidth": "4096"},
        "narrow window": {"WindowCenter": "1000", "WindowWidth": "400"},
        "two windows": {"WindowCenter": ["1500", "2500"], "WindowWidth": ["800", "3000"]},
        "LINEAR_EXACT": {"WindowCenter": "1800.5", "WindowWidth": "1200.25", "VOILUTFunction": "LINEAR_EXACT"},
        "SIGMOID": {"WindowCenter": "2000", "WindowWidth": "1500", "VOILUTFunction": "SIGMOID"},
        "rescale + window": {"RescaleSlope": "0.37", "RescaleIntercept": "-1024.5", "WindowCenter": "-300",
                             "WindowWidth": "900"},
        "rescale only": {"RescaleSlope": "1.5", "RescaleIntercept": "7"},
        "no LUT": {},
        "MONOCHROME1": {"PhotometricInterpretation": "MONOCHROME1", "WindowCenter": "2048", "WindowWidth": "3000"},
        "modality LUT": {"ModalityLUTSequence": Sequence([_lut_item(4096, 0, 16, ramp[::-1])]),
                         "WindowCenter": "30000", "WindowWidth": "40000"},
        "VOI LUT": {"VOILUTSequence": Sequence([_lut_item(3000, 500, 12, np.linspace(0, 4095, 3000))])},
        "VOI LUT + window": {"VOILUTSequence": Sequence([_lut_item(4096, 0, 16, ramp)]), "WindowCenter": "2048",
                             "WindowWidth": "4096"},
    }


@needs_pydicom
@pytest.mark.parametrize("case", list(_header_cases()))
def test_dicom_values_by_table_same_as_element_by_element(case, monkeypatch):
    seen = []
    values = decode._values
    monkeypatch.setattr(decode, "_values", lambda arr, ds: seen.append(arr.shape) or values(arr, ds))
    data = _dicom(_img12(256, 300), **_header_cases()[case])
    assert _same(data)[0] == "ok"
    assert seen[0] == (65536,)  # the faster path built a table of every stored value


@needs_pydicom
@pytest.mark.parametrize("kind", ["int16", "int8", "uint8", "multiframe"])
def test_dicom_tables_for_other_sample_types(kind):
    a = _img12(256, 300)
    win = {"RescaleSlope": "2", "RescaleIntercept": "-100", "WindowCenter": "50", "WindowWidth": "3000"}
    data = {
        "int16": lambda: _dicom(a.astype(np.int32) - 2048, signed=True, **win),
        "int8": lambda: _dicom((a >> 4).astype(np.int32) - 128, bits=8, stored=8, signed=True, **win),
        "uint8": lambda: _dicom(a >> 4, bits=8, stored=8, WindowCenter="100", WindowWidth="120"),
        "multiframe": lambda: _dicom(np.stack([a, a[::-1]]), **win),
    }[kind]()
    assert _same(data)[0] == "ok"


@needs_pydicom
@pytest.mark.parametrize("header", [
    {"WindowCenter": "100", "WindowWidth": "0"},  # LINEAR needs a width >= 1: refused as before
    {"WindowCenter": "100", "WindowWidth": "10", "VOILUTFunction": "CUBIC"},  # no such function
    {"RescaleSlope": "1e38", "RescaleIntercept": "0"},  # infinite values: refused by the finite check as before
    {"RescaleSlope": "1e35", "RescaleIntercept": "0"},  # infinite only for values the image does not hold
])
def test_dicom_hostile_lut_values_same_outcome(header):
    _same(_dicom(_img12(256, 300), **header))


@needs_pydicom
@pytest.mark.parametrize("syntax", [None, J2K_LOSSLESS])
def test_dicom_cut_pixel_data_same_typed_error(syntax):
    if syntax and not _has_plugin(syntax, "pylibjpeg"):
        pytest.skip("pylibjpeg-openjpeg")
    data = _dicom(_img12(256, 300), syntax, WindowCenter="2048", WindowWidth="4096")
    assert _same(data[: len(data) - 1000])[0] in ("CorruptImageError", "DicomError")


@needs_pydicom
def test_dicom_small_image_takes_the_reference_path(monkeypatch):
    seen = []
    values = decode._values
    monkeypatch.setattr(decode, "_values", lambda arr, ds: seen.append(arr.shape) or values(arr, ds))
    _same(_dicom(_img12(64, 80), WindowCenter="2048", WindowWidth="4096"))
    assert seen[0] == (64, 80)


def _has_plugin(syntax: str, plugin: str) -> bool:
    try:
        from pydicom.pixels.decoders.base import get_decoder

        return plugin in get_decoder(syntax).available_plugins
    except Exception:
        return False


needs_charls = pytest.mark.skipif(not HAS_PYDICOM or not _has_plugin(JPEG_LS, "pyjpegls")
                                  or not _has_plugin(JPEG_LS, "pylibjpeg"), reason="pyjpegls and pylibjpeg-libjpeg")


@needs_charls
@pytest.mark.parametrize("kind", ["lossless 12-bit", "near-lossless 12-bit", "lossless 8-bit", "lossless 16-bit",
                                  "lossless MONOCHROME1 + window", "multiframe"])
def test_jpegls_by_charls_same_pixels_as_libjpeg(kind):
    from pydicom import dcmread

    a = _img12(256, 300)
    data = {
        "lossless 12-bit": lambda: _dicom(a, JPEG_LS, WindowCenter="2048", WindowWidth="4096"),
        "near-lossless 12-bit": lambda: _dicom(a, JPEG_LS_NEAR, encode={"jls_error": 3}),
        "lossless 8-bit": lambda: _dicom(a >> 4, JPEG_LS, bits=8, stored=8),
        "lossless 16-bit": lambda: _dicom(a.astype(np.uint32) * 16 + 15, JPEG_LS, stored=16),
        "lossless MONOCHROME1 + window": lambda: _dicom(a, JPEG_LS, PhotometricInterpretation="MONOCHROME1",
                                                         WindowCenter="1000", WindowWidth="500"),
        "multiframe": lambda: _dicom(np.stack([a, a[::-1]]), JPEG_LS),
    }[kind]()
    assert decode._preferred_plugin(dcmread(io.BytesIO(data), stop_before_pixels=True)) == "pyjpegls"
    assert _same(data)[0] == "ok"


def _with_frame(data: bytes, frame: bytes) -> bytes:
    """The object with its (single) frame replaced, the encapsulation intact (a damaged stream, not a cut file)."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate

    ds = dcmread(io.BytesIO(data))
    ds.PixelData = encapsulate([frame + b"\0" * (len(frame) % 2)])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@needs_charls
def test_jpegls_damage_is_refused_with_typed_errors():
    from pydicom import dcmread
    from pydicom.encaps import generate_frames

    good = _dicom(_img12(256, 300), JPEG_LS)
    frame = next(generate_frames(dcmread(io.BytesIO(good)).PixelData, number_of_frames=1))
    mid = len(frame) // 2
    # a cut file: refused by the header check before any decoder, as before
    assert _same(good[: len(good) - 5000])[0] in ("CorruptImageError", "DicomError")
    # a damaged stream in an intact file: pylibjpeg-libjpeg decoded these into wrong pixels; CharLS finds the damage
    for what, bad in {"cut in half": frame[:mid], "cut, end marker kept": frame[:mid] + b"\xff\xd9",
                      "last bytes missing": frame[:-4], "no end marker": frame[:-2],
                      "flipped byte": frame[:mid] + bytes([frame[mid] ^ 0xFF]) + frame[mid + 1:]}.items():
        fast = _outcome(_with_frame(good, bad))
        assert fast[0] == "CorruptImageError" and "JPEG-LS pixel data is damaged" in fast[1], (what, fast[:2])
    # damage no decoder can read past: the same DicomError as before
    _same(_with_frame(good, frame[:20] + b"\xff" * 4 + frame[24:]))


@needs_charls
def test_jpegls_other_charls_failure_falls_back_to_pydicom_order(monkeypatch):
    from pydicom.pixels.decoders.base import get_decoder

    data = _dicom(_img12(256, 300), JPEG_LS)
    expected = _outcome(data)

    def unsupported(src, runner):
        raise RuntimeError("Decoding error: The JPEG-LS stream is encoded with a parameter value that is not supported")

    monkeypatch.setitem(get_decoder(JPEG_LS)._available, "pyjpegls", unsupported)
    out = _outcome(data)
    assert out[0] == "ok" and np.array_equal(out[1], expected[1])


@needs_pydicom
@pytest.mark.skipif(not HAS_PYDICOM or not _has_plugin(J2K_LOSSLESS, "pylibjpeg"), reason="pylibjpeg-openjpeg")
def test_jpeg2000_values_by_table_same_pixels():
    assert _same(_dicom(_img12(256, 300), J2K_LOSSLESS, WindowCenter="2048", WindowWidth="4096"))[0] == "ok"
