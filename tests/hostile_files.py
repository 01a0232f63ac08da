"""Generators of hostile and tricky image files (issue 13), built in memory: no large binaries in git.

Each returns bytes. Sizes are parameters so unit tests use small ones and ``benchmarks/hostile_decode.py``
the full-size cases of the report (49 MP 16-bit RGBA, 30,000 scans, gigabyte inflates).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(w: int, h: int, depth: int, ctype: int, scanlines: bytes, *, level: int = 6) -> bytes:
    """A PNG around any zlib payload of filtered scanlines (valid or not)."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(scanlines, level)) + _chunk(b"IEND", b"")


def png_wide(w: int, h: int, channels: int = 4, depth: int = 16) -> bytes:
    """A mostly flat 16-bit (RGBA by default) PNG: kilobytes on the wire, hundreds of MB decoded."""
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    row = b"\x00" + bytes(w * channels * depth // 8)
    co = zlib.compressobj(9)
    body = b"".join(co.compress(row) for _ in range(h)) + co.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def png_inflate_bomb(w: int = 512, h: int = 512, extra: int = 200_000_000) -> bytes:
    """A gray PNG whose image data inflates to ``extra`` bytes more than its rows (libpng inflates it all)."""
    raw = h * (1 + w)
    co = zlib.compressobj(9)
    block = bytes(1 << 20)
    parts, left = [], raw + extra
    while left > 0:
        n = min(left, len(block))
        parts.append(co.compress(block[:n]))
        left -= n
    parts.append(co.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def png_short_data(w: int = 256, h: int = 256) -> bytes:
    """Image data for only a third of the rows, then a well-formed IEND (libpng pads with grey)."""
    rows = b"".join(b"\x00" + bytes(range(256))[:w] * 1 for _ in range(h // 3))
    return raw_png(w, h, 8, 0, rows)


def gradient(h: int = 256, w: int = 192) -> np.ndarray:
    """An image whose orientation can be read back: bright top-left corner, dark elsewhere."""
    y, x = np.mgrid[0:h, 0:w]
    img = (255 * (1 - (y / h + x / w) / 2)).astype(np.uint8)
    img[: h // 4, : w // 4] = 255
    return img


def jpeg(img: np.ndarray, quality: int = 90, progressive: bool = False) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])
    assert ok
    return buf.tobytes()


def with_exif_orientation(jpg: bytes, orientation: int) -> bytes:
    """Insert an APP1 EXIF segment whose IFD0 holds one Orientation tag."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHIHH", 274, 3, 1, orientation, 0)
    tiff += struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpg[2:]


def jpeg_truncated_with_eoi(jpg: bytes, keep: float = 0.4) -> bytes:
    """The first ``keep`` of the file, then an end-of-image marker: looks complete, decodes grey."""
    return jpg[: int(len(jpg) * keep)] + b"\xff\xd9"


def jpeg_repeated_scans(progressive_jpg: bytes, scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until the file has ``scans`` scans."""
    last_sos = progressive_jpg.rfind(b"\xff\xda")
    eoi = progressive_jpg.rfind(b"\xff\xd9")
    scan = progressive_jpg[last_sos:eoi]
    have = progressive_jpg.count(b"\xff\xda")
    return progressive_jpg[:eoi] + scan * max(0, scans - have) + b"\xff\xd9"


def jpeg_fill_bytes(jpg: bytes, n: int) -> bytes:
    """``n`` 0xFF fill bytes before the first marker after SOI (legal; a Python byte loop took 7.7 s on 30 MB)."""
    return jpg[:2] + b"\xff" * n + jpg[2:]


def tiff(img: np.ndarray, **kw) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, img, **kw)
    return buf.getvalue()


def tiff_with_duplicated_width(img: np.ndarray, second_width: int) -> bytes:
    """A classic little-endian TIFF whose IFD lists ImageWidth twice (libtiff reads the first)."""
    data = bytearray(tiff(img))
    (off,) = struct.unpack("<I", data[4:8])
    (n,) = struct.unpack("<H", data[off : off + 2])
    entries = [bytes(data[off + 2 + 12 * k : off + 14 + 12 * k]) for k in range(n)]
    dup = struct.pack("<HHII", 256, 4, 1, second_width)
    entries.insert(1, dup)
    ifd = struct.pack("<H", n + 1) + b"".join(entries) + struct.pack("<I", 0)
    new_off = len(data) + (len(data) % 2)
    data += b"\x00" * (new_off - len(data)) + ifd
    data[4:8] = struct.pack("<I", new_off)
    return bytes(data)


def _dicom(pixel_rows: int = 64, cols: int = 64, transfer_syntax: str | None = None, private_elements: int = 0) -> bytes:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    for k in range(private_elements):  # many tiny elements in private groups before the pixels
        ds.add_new((0x0009 + 2 * (k // 0xFE00), 0x0100 + k % 0xFE00), "LO", "x")
    ds.Rows, ds.Columns = pixel_rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(pixel_rows * cols, dtype=np.uint16) % 4096).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def dicom_plain(rows: int = 64, cols: int = 64) -> bytes:
    return _dicom(rows, cols)


def dicom_deflated(rows: int = 512, cols: int = 512) -> bytes:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    return _dicom(rows, cols, DeflatedExplicitVRLittleEndian)


def dicom_many_elements(n: int = 200_000) -> bytes:
    return _dicom(private_elements=n)


def png_with_text_chunks(w: int = 256, h: int = 256, n: int = 4, inflated: int = 1 << 20, kind: bytes = b"zTXt") -> bytes:
    """A valid gray PNG followed by ``n`` compressed text chunks, each inflating to ``inflated`` bytes (issue 26.1:
    990 of 7.5 MiB each took the server to +7.5 GB; libpng keeps every text chunk)."""
    rows = b"".join(b"\x00" + bytes(range(256))[:w] * (w // 256 or 1) for _ in range(h))[: h * (w + 1)]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    text = b"Comment\x00\x00" + zlib.compress(bytes(inflated), 9)
    extra = b"".join(_chunk(kind, text) for _ in range(n))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", zlib.compress(rows, 6))
            + _chunk(b"IEND", b""))


def jpeg_restart_run(jpeg_bytes: bytes, n: int) -> bytes:
    """``n`` parameterless restart markers between SOI and the first segment (libjpeg skips them; issue 26.2:
    30 M of them froze the service's event loop for 20 s when walked one Python step each)."""
    return jpeg_bytes[:2] + b"\xff\xd0" * n + jpeg_bytes[2:]
