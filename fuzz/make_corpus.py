"""Write the small seed corpus in fuzz/corpus/decode (synthetic images only, a few KB in all).

One seed per container and depth the decoder accepts, so the fuzzer starts inside every parser
rather than having to discover PNG chunk layouts or DICOM tags by chance.
"""

import io
import sys
from pathlib import Path

import cv2
import numpy as np


def seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    g8 = (np.add.outer(np.arange(40), np.arange(36)) * 3 % 256).astype(np.uint8)
    g16 = (g8.astype(np.uint16) * 257) ^ rng.integers(0, 16, g8.shape, dtype=np.uint16)
    bgr = np.dstack([g8, g8[::-1], 255 - g8])
    bgra = np.dstack([bgr, np.full_like(g8, 255)])
    out = {}
    for name, img, ext, params in [
        ("gray8.png", g8, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 9]),
        ("gray16.png", g16, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 9]),
        ("rgba.png", bgra, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 9]),
        ("gray.jpg", g8, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 50]),
        ("progressive.jpg", bgr, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 50, cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        ("gray.bmp", g8[:34, :34], ".bmp", []),
        ("gray16.tif", g16[:33, :33], ".tiff", []),
    ]:
        ok, buf = cv2.imencode(ext, img, params)
        assert ok, name
        out[name] = buf.tobytes()
    # issue 13: high bit depth with alpha, EXIF orientation, BigTIFF, multi-page and RGBA16 TIFF
    ok, buf = cv2.imencode(".png", np.dstack([g16, g16, g16, np.full_like(g16, 65535)]), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    out["rgba16.png"] = buf.tobytes()
    exif = (b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00"
            b"\x00\x00\x00\x00\x00\x00")
    jpg = out["gray.jpg"]
    out["exif6.jpg"] = jpg[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + jpg[2:]
    try:
        import tifffile

        for name, kw, img in [("big.tif", {"bigtiff": True}, g8[:33, :33]),
                              ("deflate-rgba16.tif", {"compression": "zlib", "photometric": "rgb"},
                               np.dstack([g16, g16, g16, g16])[:33, :33]),
                              ("oriented.tif", {"extratags": [(274, 3, 1, 8, True)]}, g8[:33, :34])]:
            f = io.BytesIO()
            tifffile.imwrite(f, img, **kw)
            out[name] = f.getvalue()
        f = io.BytesIO()
        with tifffile.TiffWriter(f) as tw:  # two pages: libtiff and our header read the first
            tw.write(g8[:33, :33])
            tw.write(g16[:40, :36])
        out["multipage.tif"] = f.getvalue()
    except ImportError:
        print("tifffile not installed: no TIFF-specific seeds", file=sys.stderr)
    try:
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian

        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = "1.2.3.4"
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.Rows, ds.Columns = 34, 33
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
        ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME1"
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = (g16[:34, :33] >> 4).astype(np.uint16).tobytes()
        f = io.BytesIO()
        ds.save_as(f, enforce_file_format=True)
        out["mono1.dcm"] = f.getvalue()
    except ImportError:
        print("pydicom not installed: no DICOM seed", file=sys.stderr)
    return out


if __name__ == "__main__":
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "corpus" / "decode")
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (dest / f"{name}.seed").write_bytes(data)  # not *.png: these are fuzz seeds, not images to browse
        print(f"{name}: {len(data)} bytes")
