"""The one decoder: formats, bit depths, colour layouts, DICOM, and every kind of bad input."""

import struct
import zlib

import cv2
import numpy as np
import pytest
from conftest import HAS_PYDICOM, cxr_like, write_png

from cxr_edge.decode import DecodeLimits, decode_image
from cxr_edge.errors import (
    CorruptImageError,
    DicomError,
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    UnsupportedImageError,
)
from cxr_edge.preprocess import PreprocessSpec, pack_image

SPEC = PreprocessSpec(64, 64, "rescale")


def _encode(ext, arr, params=()):
    ok, buf = cv2.imencode(ext, arr, list(params))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
def test_8bit_gray_formats(ext):
    g = cxr_like()
    img = decode_image(_encode(ext, g))
    assert img.pixels.dtype == np.uint8 and img.bit_depth == 8
    packed = pack_image(img.pixels, SPEC)
    assert packed.shape == (64, 64, 1) and packed.dtype == np.uint8
    tol = 12 if ext == ".jpg" else 0
    ref = cv2.resize(g, (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(packed[:, :, 0].astype(int) - ref).max() <= tol


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_is_windowed_to_full_8bit_range(ext):
    g16 = (cxr_like().astype(np.uint16) * 16)  # 12-bit data in a 16-bit container
    img = decode_image(_encode(ext, g16))
    assert img.pixels.dtype == np.uint16 and img.bit_depth == 16
    packed = pack_image(img.pixels, SPEC)
    assert packed.min() <= 1 and packed.max() >= 250  # min..max stretched, not divided by 257


def test_rgb_and_rgba_become_the_same_gray():
    g = cxr_like()
    bgr = cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)
    bgra = cv2.cvtColor(g, cv2.COLOR_GRAY2BGRA)
    outs = [pack_image(decode_image(_encode(".png", a)).pixels, SPEC) for a in (g, bgr, bgra)]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_rgb_spec_keeps_rgb_order():
    bgr = np.zeros((64, 64, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR
    spec = PreprocessSpec(64, 64, "caffe", input_channels=3)
    packed = pack_image(decode_image(_encode(".png", bgr)).pixels, spec)
    assert packed[0, 0].tolist() == [200, 0, 0]


def test_path_and_bytes_give_the_same_pixels(tmp_path):
    g = cxr_like()
    p = write_png(tmp_path / "a.png", g)
    assert np.array_equal(decode_image(p).pixels, decode_image(p.read_bytes()).pixels)
    assert decode_image(str(p)).source == str(p)


def test_arrays_accepted_and_checked():
    assert decode_image(cxr_like()).format == "array"
    f = decode_image(cxr_like().astype(np.float32) / 255)
    assert pack_image(f.pixels, SPEC).max() == 255
    assert decode_image(cxr_like().astype(np.int32)).pixels.dtype == np.uint16
    bad = cxr_like().astype(np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(CorruptImageError, match="NaN or infinite"):
        decode_image(bad)
    with pytest.raises(UnsupportedImageError, match="not an image"):
        decode_image(np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(UnsupportedImageError, match="not supported"):
        decode_image(np.full((64, 64), -5, np.int16))
    with pytest.raises(UnsupportedImageError, match="not supported"):
        decode_image(np.zeros((64, 64), np.complex64))


@pytest.mark.parametrize(
    "data, error, match",
    [
        (b"", UnsupportedImageError, "empty"),
        (b"hello, I am a text file" * 10, UnsupportedImageError, "not a recognised image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\x00\x00\x01\x00" * 2 + b"\x08\x00" + b"\x01" * 90 + b"IEND\xaeB`\x82", CorruptImageError, "damaged|truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\x00" * 100 + b"IEND\xaeB`\x82", CorruptImageError, "0x0"),
    ],
)
def test_bad_bytes(data, error, match):
    with pytest.raises(error, match=match):
        decode_image(data, name="upload.png")


def test_truncated_png_and_jpeg():
    png = _encode(".png", cxr_like())
    jpg = _encode(".jpg", cxr_like())
    with pytest.raises(CorruptImageError, match="PNG is truncated"):
        decode_image(png[: len(png) // 2], name="t.png")
    with pytest.raises(CorruptImageError, match="JPEG is truncated"):
        decode_image(jpg[: len(jpg) // 2], name="t.jpg")


def test_corrupted_body_is_a_typed_error_not_a_crash():
    png = bytearray(_encode(".png", cxr_like()))
    png[60:200] = b"\x00" * 140
    with pytest.raises(ImageError):
        decode_image(bytes(png))


def _png_header_only(w, h):
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header_before_decoding():
    with pytest.raises(ImageTooLargeError, match="exceeds the limit"):
        decode_image(_png_header_only(100_000, 100_000), name="bomb.png")


def test_pixel_and_byte_limits_are_configurable(tmp_path):
    g = cxr_like(200, 200)
    with pytest.raises(ImageTooLargeError):
        decode_image(_encode(".png", g), limits=DecodeLimits(max_pixels=10_000))
    p = write_png(tmp_path / "x.png", g)
    with pytest.raises(ImageTooLargeError, match="byte limit"):
        decode_image(p, limits=DecodeLimits(max_bytes=100))


def test_tiny_and_degenerate_images():
    with pytest.raises(ImageTooSmallError, match="too small"):
        decode_image(_encode(".png", np.zeros((1, 1), np.uint8)))
    with pytest.raises(ImageTooSmallError):
        decode_image(np.zeros((1, 100_000), np.uint8))


def test_missing_file_directory_and_wrong_type(tmp_path):
    with pytest.raises(UnsupportedImageError, match="does not exist"):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(UnsupportedImageError, match="not a regular file"):
        decode_image(tmp_path)
    with pytest.raises(UnsupportedImageError, match="cannot read an image from a int"):
        decode_image(42)


def test_error_names_the_file(tmp_path):
    p = tmp_path / "study_0042.png"
    p.write_bytes(b"garbage")
    with pytest.raises(UnsupportedImageError) as e:
        decode_image(p)
    assert "study_0042.png" in str(e.value) and e.value.source == str(p)


def test_real_images_decode(real_data):
    files = sorted((real_data / "COVID").iterdir())[:5] + sorted((real_data / "Normal").iterdir())[:5]
    for f in files:
        img = decode_image(f)
        assert pack_image(img.pixels, SPEC).shape == (64, 64, 1)


# ---------------------------------------------------------------- DICOM

def _dicom_bytes(pixels=None, photometric="MONOCHROME2", window=None, frames=1):
    pydicom = pytest.importorskip("pydicom")
    import io

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "Test^Patient"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True) if "enforce_file_format" in pydicom.dcmwrite.__code__.co_varnames else ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


needs_pydicom = pytest.mark.skipif(not HAS_PYDICOM, reason="pydicom not installed (cxr-edge[dicom])")


@needs_pydicom
def test_dicom_monochrome2_and_monochrome1_inverted():
    ramp = np.tile(np.linspace(0, 4095, 64), (64, 1)).astype(np.uint16)
    m2 = pack_image(decode_image(_dicom_bytes(ramp)).pixels, SPEC)[:, :, 0]
    img1 = decode_image(_dicom_bytes(ramp, "MONOCHROME1"))
    assert "inverted MONOCHROME1" in img1.notes
    m1 = pack_image(img1.pixels, SPEC)[:, :, 0]
    assert m2[0, 0] < 5 and m2[0, -1] > 250
    assert np.abs(m1.astype(int) - (255 - m2.astype(int))).max() <= 1


@needs_pydicom
def test_dicom_window_applied():
    ramp = np.tile(np.linspace(0, 4095, 64), (64, 1)).astype(np.uint16)
    img = decode_image(_dicom_bytes(ramp, window=(1000, 400)))
    assert any("VOI" in n for n in img.notes)
    packed = pack_image(img.pixels, SPEC)[:, :, 0]
    # outside the 800..1200 window everything saturates: most of the ramp is pure white
    assert (packed[0] == 255).mean() > 0.6 and (packed[0] == 0).mean() > 0.1


@needs_pydicom
def test_dicom_without_pixels_and_garbage():
    with pytest.raises(DicomError, match="no pixel data"):
        decode_image(_dicom_bytes(None), name="sr.dcm")
    with pytest.raises(DicomError):
        decode_image(b"\x00" * 128 + b"DICM" + b"\x01" * 50, name="broken.dcm")


@needs_pydicom
def test_dicom_multiframe_uses_first_frame(tmp_path):
    frames = np.stack([np.full((64, 64), 100), np.full((64, 64), 4000)]).astype(np.uint16)
    frames[0, :32] = 3000
    p = tmp_path / "multi.dcm"
    p.write_bytes(_dicom_bytes(frames, frames=2))
    img = decode_image(p)
    assert "first frame" in img.notes[0] and img.pixels.shape == (64, 64)


def test_large_jpegs_decode_at_reduced_scale_with_the_same_packed_result():
    from cxr_edge.decode import jpeg_reduction
    from cxr_edge.preprocess import pack_source

    assert [jpeg_reduction(3000, 2500, 224), jpeg_reduction(1000, 1000, 224), jpeg_reduction(600, 600, 224),
            jpeg_reduction(300, 300, 224), jpeg_reduction(3000, 3000, None)] == [4, 2, 1, 1, 1]
    big = cv2.resize(cxr_like(256, 256), (2048, 2048), interpolation=cv2.INTER_CUBIC)
    data = _encode(".jpg", big, (cv2.IMWRITE_JPEG_QUALITY, 95))
    spec = PreprocessSpec(128, 128, "rescale")
    packed, img = pack_source(data, spec, reduce=True)  # asked for: only a passed decode gate does (decode_gate.py)
    assert pack_source(data, spec)[1].notes == []  # everyone else decodes at full resolution
    assert img.notes == ["JPEG decoded at 1/8 scale"] and img.pixels.shape[:2] == (256, 256)
    full = pack_image(decode_image(data).pixels, spec)
    assert np.abs(packed.astype(int) - full.astype(int)).mean() < 1.5  # same picture, a fraction of the work
    png_packed, png_img = pack_source(_encode(".png", big), spec)
    assert png_img.notes == [] and png_packed.shape == (128, 128, 1)
