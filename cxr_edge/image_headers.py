"""What each container's header declares, read the way its decoder will read it, before any pixel is decoded.

The decode budget (pixels, decoded bytes, progressive scans) is judged from these headers, so a header
read here must never differ from the one the decoder acts on: a check that reads the last of two
duplicated TIFF tags while libtiff reads the first is no check at all. Hence TIFF headers come from
``tifffile`` (a structure reader that follows libtiff: first of duplicated tags, BigTIFF LONG8 sizes,
at most 4096 entries), and what is ambiguous (duplicated size tags) is refused rather than guessed.
JPEG and PNG are walked segment by segment / chunk by chunk, which also gives the structural truncation
checks and the EXIF orientation (see :func:`_pick_orientation` for which block counts when there are several).
"""

from __future__ import annotations

import io
import logging
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import CorruptImageError, ImageTooLargeError, UnsupportedImageError

#: more progressive scans than any encoder writes (libjpeg's progressive script uses 10; 64 leaves room for
#: custom scripts), because libjpeg decodes every scan and a file repeating one scan thousands of times holds
#: a decoder for minutes (SECURITY.md)
MAX_JPEG_SCANS = 64
#: PNG chunk walk limit: real files have tens to a few thousand chunks (one IDAT per 8-64 kB)
MAX_PNG_CHUNKS = 200_000

# a marker after entropy-coded data: 0xFF followed by anything but stuffing (00), RSTn (D0-D7) or fill (FF)
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_FILL = re.compile(rb"\xff+")
# bytes a run of parameterless markers (RSTn, TEM, SOI) and their fill consists of: one character class, which
# the regex engine scans in one pass (a repeated group, (?:\xff+[...])*, pays per repetition and was slower)
_PARAMLESS_RUN = re.compile(rb"[\xff\x01\xd0-\xd8]*")
_FILL_OR_NOT = bytes.maketrans(bytes(range(256)), b"x" * 255 + b"f")  # 0xFF -> f, any other byte -> x
# SOFn markers, less DHT (C4), JPG (C8) and DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # colour type -> channels after palette expansion


@dataclass(frozen=True)
class ImageHeader:
    """What a header declares: size, samples, depth, orientation, and (JPEG) the coding process."""

    height: int
    width: int
    channels: int
    bits: int  # bits per sample
    orientation: int = 1  # EXIF/TIFF orientation 1-8 (1 = as stored)
    jpeg_process: int | None = None  # SOF marker (0xC0 baseline, 0xC2 progressive, ...)
    scans: int = 0

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the pixel array a decoder produces with every channel at the declared depth."""
        return self.height * self.width * self.channels * (2 if self.bits > 8 else 1)


#: EXIF value types Pillow reads as integers: type -> (struct code, size); BYTE, SHORT, LONG, SBYTE, SSHORT, SLONG
_EXIF_INT_TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4), 6: ("b", 1), 8: ("h", 2), 9: ("i", 4)}


def _as_orientation(value: int | None) -> int:
    """An orientation as decoders apply it: 1-8, and anything else as stored."""
    return value if value is not None and 1 <= value <= 8 else 1


def _exif_orientation(tiff: bytes) -> tuple[int, int] | None:
    """IFD0's first Orientation entry (tag 274) as ``(OpenCV's reading, Pillow's reading)``, each 1 (as stored)
    outside 1-8; None when the block has no Orientation entry or is not a readable TIFF structure.

    OpenCV reads the first 16 bits of the value field whatever the entry's type; Pillow reads the first value
    of the declared type. The two differ only for entries the standard does not write (a big-endian LONG, a
    value stored out of line), which :func:`_pick_orientation` refuses. The entry table is searched with NumPy:
    a Python step per entry made huge eXIf chunks cost seconds.
    """
    if tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    end = "<" if tiff[:1] == b"I" else ">"
    try:
        (off,) = struct.unpack_from(end + "I", tiff, 4)
        (n,) = struct.unpack_from(end + "H", tiff, off)
        n = min(n, (len(tiff) - off - 2) // 12)  # the entries that are in the block
        if n <= 0:
            return None
        table = np.frombuffer(tiff, dtype=np.dtype([("tag", end + "u2"), ("rest", "V10")]), count=n, offset=off + 2)
        hits = np.flatnonzero(table["tag"] == 274)
        if not hits.size:
            return None
        e = off + 2 + 12 * int(hits[0])
        typ, count = struct.unpack_from(end + "HI", tiff, e + 2)
        (cv,) = struct.unpack_from(end + "H", tiff, e + 8)
    except (struct.error, ValueError):  # a table past the end of the block: no readable orientation
        return None
    pil = None
    if typ in _EXIF_INT_TYPES and count >= 1:
        code, size = _EXIF_INT_TYPES[typ]
        try:
            at = e + 8 if size * count <= 4 else struct.unpack_from(end + "I", tiff, e + 8)[0]
            (pil,) = struct.unpack_from(end + code, tiff, at)
        except struct.error:  # an out-of-line value past the end of the block: Pillow finds none
            pil = None
    return _as_orientation(cv), _as_orientation(pil)


def _pick_orientation(blocks: list[tuple[int, int] | None], fmt: str, name: str) -> int:
    """One orientation from a file's EXIF blocks, in file order: the first block's, and a refusal where OpenCV and
    Pillow would show the file differently, so that no decoder the user compares with shows another image.

    JPEG: Pillow and OpenCV read the first Exif APP1 segment before the first scan and ignore later Exif, XMP
    and other APP1 segments, so its orientation is used whatever it says, 1 included. PNG: libpng, and so
    OpenCV, keep the first eXIf chunk and drop the rest as duplicates, while Pillow reads the last one
    before the image data. Where the decoders would still disagree the file is refused rather than guessed:
    a first JPEG Exif block without an Orientation entry followed by one that rotates (OpenCV applies the
    later block, Pillow none), PNG eXIf chunks that differ, or an entry whose readings differ (see
    :func:`_exif_orientation`). So the pixels we decode are the ones both OpenCV and Pillow show.
    """
    if not blocks:
        return 1
    first = blocks[0]
    if fmt == "jpeg":
        opencv = next((b[0] for b in blocks if b is not None), 1)  # first block that has an Orientation entry
        pillow = first[1] if first is not None else 1
    else:
        opencv = first[0] if first is not None else 1
        readings = {b[1] if b is not None else 1 for b in blocks}  # Pillow's is the last before the image data
        pillow = opencv if readings == {opencv} else min(readings - {opencv})
    if opencv != pillow:
        source = f"its {len(blocks)} EXIF blocks" if len(blocks) > 1 else "a non-standard Orientation entry"
        raise CorruptImageError(name, f"{fmt.upper()} EXIF orientation is ambiguous (OpenCV reads {opencv} and Pillow "
                                      f"{pillow} from {source}); decoders disagree on such files, so it is refused. "
                                      "Re-export it with one EXIF block.")
    return opencv


def _skip_parameterless(data: bytes, i: int, name: str) -> int:
    """The index after the run of parameterless markers starting at ``i`` (where the next real marker's fill
    begins), in C-speed steps; a byte in it that is not a marker (two marker codes with no 0xFF between them)
    is stray data, refused as the per-marker walk refused it."""
    end = _PARAMLESS_RUN.match(data, i).end()  # type: ignore[union-attr]
    run = data[i:end].rstrip(b"\xff")  # trailing fill belongs to the marker that follows
    shape = run.translate(_FILL_OR_NOT)
    if shape and (shape[:1] != b"f" or b"xx" in shape):
        raise CorruptImageError(name, f"JPEG has stray data near byte {i} between segments; the file is damaged.")
    return i + len(run)


def jpeg_header(data: bytes, name: str, first_scan_only: bool = False) -> ImageHeader:
    """Walk the JPEG marker segments to the end-of-image marker.

    Raises for what libjpeg only warns about and then decodes as grey: no end-of-image marker, bytes
    between segments, a segment running past the end; and refuses more than :data:`MAX_JPEG_SCANS` scans.
    Data appended after the end-of-image marker is ignored, as every decoder does. Runs of parameterless
    markers (RSTn, TEM, SOI outside a scan) are skipped by one regular-expression match, at C speed, because one
    Python step per marker holds the GIL for seconds on a file of millions of restart markers
    (benchmarks/results/hostile_round3/).

    ``first_scan_only``: stop at the first scan (the frame header, orientation and process are known by then);
    the routing check reads only a bounded prefix this way.

    Orientation: the Exif APP1 segments before the first scan, by :func:`_pick_orientation` (first block wins;
    ambiguous files refused). Segments after the first scan are outside the header libjpeg reads, and
    neither Pillow nor OpenCV applies them.
    """
    n = len(data)
    i = 2
    sof: tuple[int, int, int, int, int] | None = None
    orientation, scans = 1, 0
    exif: list[tuple[int, int] | None] = []
    while True:
        if i >= n:
            raise CorruptImageError(name, "JPEG is truncated (no end-of-image marker); re-export or re-send the file.")
        if data[i] != 0xFF:
            raise CorruptImageError(name, f"JPEG has stray data at byte {i} between segments; the file is damaged.")
        i = _FILL.match(data, i).end()  # type: ignore[union-attr]  # fill bytes: any number of 0xFF
        if i >= n:
            raise CorruptImageError(name, "JPEG is truncated (no end-of-image marker); re-export or re-send the file.")
        marker = data[i]
        i += 1
        if marker == 0xD9:
            break
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):
            i = _skip_parameterless(data, i, name)
            continue
        if i + 2 > n:
            raise CorruptImageError(name, "JPEG is truncated inside a segment header.")
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2 or i + length > n:
            raise CorruptImageError(name, f"JPEG segment 0x{marker:02X} runs past the end of the file; it is truncated.")
        seg = data[i + 2 : i + length]
        if marker in _SOF and sof is None:
            if len(seg) < 6:
                raise CorruptImageError(name, "JPEG frame header is too short; the file is damaged.")
            bits, h, w, comps = struct.unpack(">BHHB", seg[:6])
            sof = (marker, bits, h, w, comps)
        elif marker == 0xE1 and seg[:6] == b"Exif\x00\x00" and scans == 0:
            exif.append(_exif_orientation(seg[6:]))
        elif marker == 0xDA:
            if sof is None:
                raise CorruptImageError(name, "JPEG scan before its frame header; the file is damaged.")
            if scans == 0:
                orientation = _pick_orientation(exif, "jpeg", name)
            scans += 1
            if first_scan_only:
                break
            if scans > MAX_JPEG_SCANS:
                raise UnsupportedImageError(
                    name, f"JPEG has more than {MAX_JPEG_SCANS} scans (encoders write about 10); refused as a "
                    "decoding-time bomb. Re-encode it as a baseline JPEG or PNG.")
            m = _NEXT_MARKER.search(data, i + length)
            if m is None:
                raise CorruptImageError(name, "JPEG is truncated inside its image data (no end-of-image marker).")
            i = m.start()
            continue
        i += length
    if sof is None:
        raise CorruptImageError(name, "JPEG has no frame header; the file is damaged.")
    if scans == 0:
        raise CorruptImageError(name, "JPEG has no image data (no scan); the file is damaged.")
    marker, bits, h, w, comps = sof
    return ImageHeader(h, w, comps, bits, orientation, marker, scans)


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_raw_size(w: int, h: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes of filtered scanlines the zlib stream of a well-formed PNG inflates to, exactly."""
    if not interlaced:
        return h * (1 + (w * bits_per_pixel + 7) // 8)
    total = 0
    for x0, y0, dx, dy in _ADAM7:
        pw, ph = -(-(w - x0) // dx) if w > x0 else 0, -(-(h - y0) // dy) if h > y0 else 0
        if pw and ph:
            total += ph * (1 + (pw * bits_per_pixel + 7) // 8)
    return total


#: largest image data (bytes of filtered scanlines) confirmed by one libdeflate call into a buffer of that size;
#: above it, and wherever libdeflate does not confirm, the streaming check below (1 MiB of memory) decides
ONE_SHOT_INFLATE_MAX = 64 << 20


def _inflates_exactly(pieces: list[memoryview], limit: int) -> bool:
    """Whether the IDAT zlib stream is whole and inflates to exactly ``limit`` bytes, by libdeflate (imagecodecs):
    1.5-2x faster than zlib's streaming inflate, which is a third of a PNG's decode time.

    It only ever confirms a well-formed stream: an error of any kind (more output than ``limit``, a damaged or cut
    stream, a bad checksum) returns False and the streaming check gives its verdict and message as before. Only the
    header every encoder writes (0x78: deflate, 32 KiB window) is taken; anything else is left to that check.
    """
    if not 0 < limit <= ONE_SHOT_INFLATE_MAX:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    stream = b"".join(pieces)
    if len(stream) < 6 or stream[0] != 0x78:  # CM 8 (deflate), CINFO 7 (32 KiB window)
        return False
    try:
        got = len(imagecodecs.deflate_decode(stream, out=bytearray(limit + 1)))
    except Exception:  # imagecodecs.DeflateError: damaged, cut, too long, bad Adler-32: for zlib to judge
        return False
    return got == limit


def _inflated_size(pieces: list[memoryview], limit: int) -> int:
    """Bytes the IDAT zlib stream inflates to, stopping as soon as it passes ``limit`` (memory: 1 MiB, or the image
    data's size where :func:`_inflates_exactly` confirms it)."""
    if _inflates_exactly(pieces, limit):
        return limit
    d = zlib.decompressobj()
    total = 0
    try:
        for piece in pieces:
            buf: bytes | memoryview = piece
            while buf and not d.eof:
                total += len(d.decompress(buf, 1 << 20))
                if total > limit:
                    return total
                buf = d.unconsumed_tail
        while not d.eof and (out := d.decompress(b"", 1 << 20)):
            total += len(out)
            if total > limit:
                return total
    except zlib.error:
        return -1
    return total


def png_header(data: bytes, name: str, check: Callable[[ImageHeader], None] | None = None) -> ImageHeader:
    """IHDR plus a walk over the chunks: IEND must be there, and the image data must inflate to exactly
    the scanlines the header declares.

    libpng inflates *all* of the image data even after the last row (gigabytes of appended zeros hold a
    decoder for seconds; SECURITY.md), and it pads missing rows with grey after a warning.
    Inflating here with a bound (no more than the declared size, 1 MiB of memory) refuses both before
    decoding; it costs one inflate of the image, a fraction of the decode.
    """
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise CorruptImageError(name, "PNG has no image header (IHDR); the file is damaged.")
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if w == 0 or h == 0:
        raise CorruptImageError(name, f"PNG header declares a {w}x{h} image; the file is damaged.")
    if ctype not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise CorruptImageError(name, f"PNG declares colour type {ctype} at {depth} bits, which does not exist; "
                                      "the file is damaged.")
    channels = _PNG_CHANNELS[ctype]
    i, chunks, ended = 8, 0, False
    exif: list[tuple[int, int] | None] = []
    idat: list[memoryview] = []
    view = memoryview(data)
    n = len(data)
    while i + 8 <= n:
        length, ctype_b = struct.unpack(">I4s", data[i : i + 8])
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise UnsupportedImageError(name, f"PNG has more than {MAX_PNG_CHUNKS:,} chunks; refused.")
        if i + 12 + length > n:
            raise CorruptImageError(name, "PNG is truncated (a chunk runs past the end); re-export or re-send the file.")
        if ctype_b == b"IDAT":
            idat.append(view[i + 8 : i + 8 + length])
        elif ctype_b == b"eXIf":  # before or after the image data: libpng reads both
            exif.append(_exif_orientation(data[i + 8 : i + 8 + length]))
        elif ctype_b == b"IEND":
            ended = True
            break
        i += 12 + length
    if not ended:
        raise CorruptImageError(name, "PNG is truncated (no IEND chunk); re-export or re-send the file.")
    hdr = ImageHeader(h, w, channels, 8 if ctype == 3 else depth, _pick_orientation(exif, "png", name))
    if check is not None:  # the caller's size budget, judged before the inflate below costs anything
        check(hdr)
    raw = png_raw_size(w, h, depth * (1 if ctype == 3 else channels), bool(interlace))
    got = _inflated_size(idat, raw)
    if got < 0:
        raise CorruptImageError(name, "PNG image data is not a valid zlib stream; the file is damaged.")
    if got > raw:
        raise CorruptImageError(name, f"PNG image data inflates to more than the {raw:,} bytes its header declares; "
                                      "the file is damaged or crafted to stall decoders.")
    if got < raw:
        raise CorruptImageError(name, f"PNG image data is truncated ({got:,} of {raw:,} bytes); re-export or re-send the file.")
    return hdr


def bmp_header(data: bytes, name: str) -> ImageHeader:
    if len(data) < 30:
        raise CorruptImageError(name, "BMP header is truncated.")
    if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sides
        w, h = struct.unpack("<HH", data[18:22])
        (bpp,) = struct.unpack("<H", data[24:26])
    else:
        w, h = struct.unpack("<ii", data[18:26])
        (bpp,) = struct.unpack("<H", data[28:30])
    return ImageHeader(abs(h), abs(w), 4 if bpp == 32 else 3 if bpp > 8 else 1, 8)


def tiff_header(data: bytes, name: str) -> ImageHeader:
    """The first image's header as libtiff reads it (via tifffile, which follows the same rules)."""
    from .extras import require

    tifffile = require("tifffile")
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # its warnings become our one error below
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            tags = page.tags
            for code, what in ((256, "ImageWidth"), (257, "ImageLength"), (258, "BitsPerSample"), (277, "SamplesPerPixel")):
                if len(tags.getall(code, default=[])) > 1:
                    raise CorruptImageError(name, f"TIFF repeats its {what} tag; decoders disagree on such files, so "
                                                  "it is refused.")
            h, w = int(page.imagelength), int(page.imagewidth)
            spp, bits = int(page.samplesperpixel), int(page.bitspersample)
            orientation = tags.valueof(274, default=1) or 1
            if isinstance(orientation, tuple):  # libtiff (so OpenCV) ignores an Orientation of several values
                if 2 <= (orientation[0] if orientation else 1) <= 8:  # ... and Pillow applies the first
                    raise CorruptImageError(name, f"TIFF Orientation holds {len(orientation)} values, which libtiff "
                                                  "ignores and other readers apply; decoders disagree on such files, "
                                                  "so it is refused.")
                orientation = 1
            orientation = int(orientation)
    except CorruptImageError:
        raise
    except Exception as exc:  # tifffile raises TiffFileError, struct/value errors for damaged structures
        raise CorruptImageError(name, f"TIFF structure is unreadable ({type(exc).__name__}: {exc}).") from exc
    if not 1 <= orientation <= 8:
        orientation = 1
    return ImageHeader(h, w, spp, bits, orientation)


def read_header(fmt: str, data: bytes, name: str, check: Callable[[ImageHeader], None] | None = None) -> ImageHeader:
    """The header of a PNG/JPEG/BMP/TIFF; ``check`` (the caller's size budget) runs on it before any
    work that grows with the declared size."""
    def png_check(h: ImageHeader) -> None:
        _check_positive(h, fmt, name)
        if check is not None:
            check(h)

    try:
        if fmt == "png":
            return png_header(data, name, png_check)
        hdr = {"jpeg": jpeg_header, "bmp": bmp_header, "tiff": tiff_header}[fmt](data, name)
    except struct.error as exc:
        raise CorruptImageError(name, f"{fmt.upper()} header is truncated.") from exc
    _check_positive(hdr, fmt, name)
    if check is not None:
        check(hdr)
    return hdr


def _check_positive(hdr: ImageHeader, fmt: str, name: str) -> None:
    if hdr.height <= 0 or hdr.width <= 0:
        raise CorruptImageError(name, f"{fmt.upper()} header declares a {hdr.width}x{hdr.height} image; the file is damaged.")


def check_decoded_bytes(hdr: ImageHeader, name: str, max_decoded_bytes: int) -> None:
    if hdr.decoded_bytes > max_decoded_bytes:
        raise ImageTooLargeError(
            name, f"{hdr.width}x{hdr.height} with {hdr.channels} channel(s) at {hdr.bits} bits decodes to "
            f"{hdr.decoded_bytes / 2**20:,.0f} MiB, over the {max_decoded_bytes / 2**20:,.0f} MiB per-image budget; "
            "send it as 8-bit grayscale or down-sample it.")
