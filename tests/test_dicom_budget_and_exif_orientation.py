"""The DICOM header budget is on what pydicom parses, not on where some bytes sit, and one EXIF orientation rule
that gives the pixels OpenCV and Pillow show (or refuses where they disagree).

All inputs are built here, small; the DICOM budgets are set low so that a refusal is cheap and its absence
(a parse of every element) is visible in the count of elements pydicom parsed, not in a timing."""

from __future__ import annotations

import io
import struct
import zlib

import hostile_files as H
import numpy as np
import pytest

from cxr_edge.decode import DecodeLimits, decode_image
from cxr_edge.errors import CorruptImageError, DicomError

PIXEL_TAG_LE = b"\xe0\x7f\x10\x00"


# ------------------------------------------------------------------ DICOM: the header budget

@pytest.fixture
def parsed(monkeypatch):
    """Counts the data elements pydicom parses (all parses together), to show where parsing stopped."""
    pytest.importorskip("pydicom")
    from pydicom import filereader

    count = [0]
    real = filereader.data_element_generator

    def counting(*args, **kwargs):
        for elem in real(*args, **kwargs):
            count[0] += 1
            yield elem

    monkeypatch.setattr(filereader, "data_element_generator", counting)
    return count


def _dicom(ts: str = "explicit-le") -> bytes:
    """A valid 64x48 DX image (preamble, meta group) in the given transfer syntax."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = {"explicit-le": ExplicitVRLittleEndian, "implicit-le": ImplicitVRLittleEndian,
                              "explicit-be": ExplicitVRBigEndian}[ts]
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = 64, 48
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    order = ">" if ts == "explicit-be" else "<"
    ds.PixelData = (np.arange(64 * 48) % 4096).astype(order + "u2").tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _dataset_start(data: bytes) -> int:
    """After the meta group: its (0002,0000) group length (explicit VR little endian, 12 bytes) says where."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    return 132 + 12 + struct.unpack_from("<I", data, 140)[0]


def _tiny_elements(n: int, ts: str = "explicit-le", group: int = 0x0009) -> bytes:
    """``n`` private LO elements of 2 bytes each (10 bytes a piece, 12 in implicit VR)."""
    out = bytearray()
    for k in range(n):
        g, e = group + 2 * (k // 0xFE00), 0x0100 + k % 0xFE00
        if ts == "implicit-le":
            out += struct.pack("<HHI", g, e, 2) + b"x "
        else:
            out += struct.pack(("<" if ts == "explicit-le" else ">") + "HH2sH", g, e, b"LO", 2) + b"x "
    return bytes(out)


def _insert(data: bytes, at: int, blob: bytes) -> bytes:
    return data[:at] + blob + data[at:]


def _with_tag_in_preamble(data: bytes) -> bytes:
    return PIXEL_TAG_LE + data[4:]


SMALL = DecodeLimits(max_dicom_header_bytes=16_384)


@pytest.mark.parametrize("ts", ["explicit-le", "implicit-le", "explicit-be"])
def test_pixel_tag_in_the_preamble_does_not_skip_the_header_budget(ts, parsed):
    plain = _dicom(ts)
    good = decode_image(plain, name="plain.dcm", limits=SMALL)
    assert good.pixels.shape == (64, 48)
    # the preamble trick on a legitimate file with a modest header: no false refusal, the same pixels
    modest = _with_tag_in_preamble(_insert(plain, _dataset_start(plain), _tiny_elements(300, ts)))
    assert np.array_equal(decode_image(modest, name="modest.dcm", limits=SMALL).pixels, good.pixels)
    # ... and with 20,000 elements (200 kB) it is refused once pydicom has parsed the budget's worth, no more
    hostile = _with_tag_in_preamble(_insert(plain, _dataset_start(plain), _tiny_elements(20_000, ts)))
    parsed[0] = 0
    with pytest.raises(DicomError, match="over the 16,384-byte limit before the pixel data; strip private"):
        decode_image(hostile, name="hostile.dcm", limits=SMALL)
    assert parsed[0] < 16_384 // 10 + 50, parsed[0]


def test_private_value_holding_the_pixel_tag_early_does_not_skip_the_header_budget(parsed):
    plain = _dicom()
    start = _dataset_start(plain)
    ob = struct.pack("<HH2sHI", 0x0009, 0x0010, b"OB", 0, 4) + PIXEL_TAG_LE  # a private OB value: the tag bytes
    assert np.array_equal(decode_image(_insert(plain, start, ob + _tiny_elements(300)), name="ok.dcm",
                                       limits=SMALL).pixels, decode_image(plain, name="plain.dcm").pixels)
    parsed[0] = 0
    with pytest.raises(DicomError, match="over the 16,384-byte limit before the pixel data"):
        decode_image(_insert(plain, start, ob + _tiny_elements(20_000)), name="ob.dcm", limits=SMALL)
    assert parsed[0] < 16_384 // 10 + 50, parsed[0]


def test_budget_reached_inside_a_sequence_item_is_still_the_budget():
    """pydicom re-raises anything met while reading an item header as OSError ("No tag to read"): the refusal
    must still name the budget, not call the file unreadable."""
    pytest.importorskip("pydicom")
    plain = _dicom()
    items = struct.pack("<HHI", 0xFFFE, 0xE000, 0) * 5_000  # empty items: every read is an item header
    sq = struct.pack("<HH2sHI", 0x0009, 0x1001, b"SQ", 0, 0xFFFFFFFF) + items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    hostile = _with_tag_in_preamble(_insert(plain, _dataset_start(plain), sq))
    for limit in range(16_384, 16_384 + 8):  # one item's period: some of these end inside an item-header read
        with pytest.raises(DicomError, match=f"over the {limit:,}-byte limit before the pixel data"):
            decode_image(hostile, name="items.dcm", limits=DecodeLimits(max_dicom_header_bytes=limit))


def test_file_meta_group_is_within_the_budget_too(parsed):
    """The transfer-syntax probe parsed the whole meta group before any check, so a flooded one cost seconds."""
    plain = _dicom()
    flood = _tiny_elements(20_000, group=0x0002)  # more group-2 elements, in the meta group's own encoding
    hostile = _insert(plain, _dataset_start(plain), flood)
    with pytest.raises(DicomError, match="over the 16,384-byte limit"):  # refused before too, but after parsing it all
        decode_image(hostile, name="meta.dcm", limits=SMALL)
    assert parsed[0] < 2 * (16_384 // 10) + 50, parsed[0]


def test_elements_after_the_pixel_data_are_not_parsed(parsed):
    """Nothing after the pixel data changes the pixels (signatures, padding), and millions of elements there cost seconds."""
    plain = _dicom()
    trailing = b"".join(struct.pack("<HH2sH", 0x7FE1 + 2 * (k // 0xFE00), 0x0100 + k % 0xFE00, b"LO", 2) + b"x "
                        for k in range(20_000))
    parsed[0] = 0
    img = decode_image(plain + trailing, name="trailing.dcm", limits=SMALL)
    assert np.array_equal(img.pixels, decode_image(plain, name="plain.dcm").pixels)
    assert parsed[0] < 100, parsed[0]


def test_pixel_data_parsed_as_a_sequence_is_refused(parsed):
    """Explicit VR UN of undefined length is parsed as a sequence: element by element, after the budget."""
    plain = _dicom()
    at = plain.find(PIXEL_TAG_LE + b"OW")
    item = (struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + _tiny_elements(5_000)
            + struct.pack("<HHI", 0xFFFE, 0xE00D, 0))
    hostile = plain[:at] + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"UN", 0, 0xFFFFFFFF) + item + \
        struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    parsed[0] = 0
    with pytest.raises(DicomError, match="pixel data is encoded as a sequence"):
        decode_image(hostile, name="unsq.dcm", limits=SMALL)
    assert parsed[0] < 100, parsed[0]


# ------------------------------------------------------------------ EXIF orientation: one rule

def _ifd(*entries: tuple[int, int, int, int], end: str = "<") -> bytes:
    """A TIFF block whose IFD0 holds ``(tag, type, count, value)`` entries (SHORT values left-justified)."""
    out = (b"II*\x00" if end == "<" else b"MM\x00*") + struct.pack(end + "IH", 8, len(entries))
    for tag, typ, count, value in entries:
        field = struct.pack(end + "HH", value, 0) if typ == 3 else struct.pack(end + "I", value)
        out += struct.pack(end + "HHI", tag, typ, count) + field
    return out + struct.pack(end + "I", 0)


def _orient(value: int, typ: int = 3) -> tuple[int, int, int, int]:
    return (274, typ, 1, value)


NO_ORIENTATION = (270, 2, 4, 0x00414141)  # an ImageDescription "AAA": a valid block without an Orientation


def _app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _exif(*entries, end: str = "<") -> bytes:
    return _app1(b"Exif\x00\x00" + _ifd(*entries, end=end))


XMP = _app1(b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><rdf:Description tiff:Orientation='8'/></x:xmpmeta>")
SRC = H.gradient(1024, 768)


def _jpeg(*segments: bytes) -> bytes:
    jpg = H.jpeg(SRC)
    return jpg[:2] + b"".join(segments) + jpg[2:]


def _png(*exif_blocks: bytes, after_idat: tuple[bytes, ...] = ()) -> bytes:
    import cv2

    data = cv2.imencode(".png", SRC)[1].tobytes()

    def chunk(t: bytes) -> bytes:
        return len(t).to_bytes(4, "big") + b"eXIf" + t + zlib.crc32(b"eXIf" + t).to_bytes(4, "big")

    iend = data.rfind(b"IEND") - 4
    return data[:33] + b"".join(map(chunk, exif_blocks)) + data[33:iend] + b"".join(map(chunk, after_idat)) + data[iend:]


def _corner(img: np.ndarray) -> str:
    h, w = img.shape[:2]
    corners = {"tl": img[: h // 8, : w // 8], "tr": img[: h // 8, -w // 8 :], "bl": img[-h // 8 :, : w // 8],
               "br": img[-h // 8 :, -w // 8 :]}
    return max(corners, key=lambda k: float(corners[k].mean()))


def _opencv(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)  # default: applies the orientation


def _pillow_corner(data: bytes) -> str | None:
    """Where Pillow's exif_transpose puts the bright corner; None where Pillow is not installed."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        return None
    return _corner(np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L")))


def _assert_like_opencv(data: bytes, corner: str, reduced: bool) -> None:
    full = decode_image(data, name="o", channels=1)
    cv = _opencv(data)
    assert full.pixels.shape == cv.shape and np.array_equal(full.pixels, cv)
    assert _corner(full.pixels) == corner
    assert _pillow_corner(data) in (None, corner)
    if reduced:  # the same rule at reduced scale
        small = decode_image(data, name="o", channels=1, reduce_for=64)
        assert any("scale" in n for n in small.notes) and _corner(small.pixels) == corner


def _exif_after_first_scan(orientation: int) -> bytes:
    """A progressive JPEG with an Exif block between its scans: outside the header libjpeg reads."""
    prog = H.jpeg(SRC, progressive=True)
    second = prog.find(b"\xff\xda", prog.find(b"\xff\xda") + 2)
    return prog[:second] + _exif(_orient(orientation)) + prog[second:]


# the corner of H.gradient's bright square after the orientation applies: 1 as stored, 6 turned clockwise
JPEG_CASES = {
    "Exif 1 then Exif 6": (_jpeg(_exif(_orient(1)), _exif(_orient(6))), "tl"),  # the first wins, 1 included
    "Exif 6 then Exif 1": (_jpeg(_exif(_orient(6)), _exif(_orient(1))), "tr"),
    "Exif 6 then Exif 8": (_jpeg(_exif(_orient(6)), _exif(_orient(8))), "tr"),
    "Exif 6 then XMP": (_jpeg(_exif(_orient(6)), XMP), "tr"),  # XMP APP1: not an Exif block, ignored
    "XMP then Exif 6": (_jpeg(XMP, _exif(_orient(6))), "tr"),
    "XMP then Exif 1": (_jpeg(XMP, _exif(_orient(1))), "tl"),
    "first Exif's invalid 0, then 6": (_jpeg(_exif(_orient(0)), _exif(_orient(6))), "tl"),
    "LONG orientation 6, little endian": (_jpeg(_exif(_orient(6, typ=4))), "tr"),  # both decoders read 6
    "Exif 6 after the first scan": (_exif_after_first_scan(6), "tl"),
}


def test_jpeg_exif_orientation_first_block_wins_like_opencv_and_pillow():
    """Was: the first Exif block whose orientation was not 1, and Exif blocks anywhere in the file."""
    for label, (data, corner) in JPEG_CASES.items():
        try:
            _assert_like_opencv(data, corner, reduced=True)
        except AssertionError as exc:
            raise AssertionError(f"{label}: {exc}") from exc


@pytest.mark.parametrize("label, data, readings", [
    ("no Orientation in the first Exif, 6 in the second", _jpeg(_exif(NO_ORIENTATION), _exif(_orient(6))), "6 and Pillow 1"),
    ("unreadable first Exif, 6 in the second", _jpeg(_app1(b"Exif\x00\x00not a TIFF block"), _exif(_orient(6))),
     "6 and Pillow 1"),
    ("big-endian LONG orientation 6", _jpeg(_exif(_orient(6, typ=4), end=">")), "1 and Pillow 6"),  # 16 high bits
])
def test_jpeg_exif_orientation_the_decoders_disagree_on_is_refused(label, data, readings):
    """Files OpenCV and Pillow show differently (one rotated, one as stored): refused rather than guessed."""
    with pytest.raises(CorruptImageError, match=f"orientation is ambiguous \\(OpenCV reads {readings}"):
        decode_image(data, name="x.jpg", channels=1)
    cv, pil = _corner(_opencv(data)), _pillow_corner(data)
    assert pil is None or pil != cv  # the disagreement is real


def test_png_exif_chunks_first_wins_and_disagreeing_chunks_are_refused():
    """libpng (so OpenCV) keeps the first eXIf chunk and Pillow the last: they agree only when the chunks do."""
    for data, corner in [(_png(_ifd(_orient(6))), "tr"), (_png(_ifd(_orient(6)), _ifd(_orient(6))), "tr"),
                         (_png(after_idat=(_ifd(_orient(3)),)), "br"), (_png(_ifd(_orient(6, typ=4))), "tr")]:
        _assert_like_opencv(data, corner, reduced=False)
    for data in [_png(_ifd(_orient(1)), _ifd(_orient(6))), _png(_ifd(_orient(6)), _ifd(_orient(1))),
                 _png(_ifd(_orient(6)), _ifd(_orient(8))), _png(_ifd(NO_ORIENTATION), _ifd(_orient(6))),
                 _png(_ifd(_orient(1)), after_idat=(_ifd(_orient(6)),))]:
        with pytest.raises(CorruptImageError, match="PNG EXIF orientation is ambiguous"):
            decode_image(data, name="x.png", channels=1)


def test_orientation_entry_past_4096_entries_is_read_as_the_decoders_read_it():
    many = [(1, 3, 1, 0)] * 5_000  # InteropIndex entries, then the Orientation: OpenCV and Pillow read it
    _assert_like_opencv(_png(_ifd(*many, _orient(6))), "tr", reduced=False)


def test_tiff_orientation_of_several_values_is_refused_with_a_reason():
    """libtiff ignores it (OpenCV shows the image as stored), Pillow applies its first value."""
    with pytest.raises(CorruptImageError, match="TIFF Orientation holds 2 values"):
        decode_image(H.tiff(SRC, extratags=[(274, 3, 2, (6, 1), True)]), name="x.tif", channels=1)
    as_stored = decode_image(H.tiff(SRC, extratags=[(274, 3, 2, (1, 6), True)]), name="y.tif", channels=1)
    assert _corner(as_stored.pixels) == "tl"
