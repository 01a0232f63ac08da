"""Which uploads decode inline and which go to a worker: only files whose header proves them cheap stay in the
server's threads (no memory ceiling there), and the routing check itself reads a bounded prefix and skips
runs of JPEG restart markers in one step.

(Signed bytes and renamed roles: tests/test_trust.py.)
"""

from __future__ import annotations

import hostile_files as H
import numpy as np
import pytest

from cxr_edge import image_headers
from cxr_edge.decode import decode_image
from cxr_edge.decode_workers import header_bounded

INLINE = 16 << 20  # the service's default inline budget (DecodeIsolation.inline_max_bytes)


def test_pngs_with_compressed_text_chunks_never_decode_inline():
    """The thread path has no memory ceiling, so only PNGs proven cheap go there."""
    plain = H.png_with_text_chunks(n=0)
    assert header_bounded(plain, INLINE)  # an ordinary small PNG still takes the fast path
    for kind in (b"zTXt", b"iTXt", b"iCCP"):
        assert not header_bounded(H.png_with_text_chunks(n=1, inflated=1 << 16, kind=kind), INLINE)
    padded = H.png_with_text_chunks(n=8, inflated=1 << 10, kind=b"tEXt")  # uncompressed, but the file outgrows its pixels
    assert header_bounded(padded, INLINE) == (len(padded) <= 256 * 257 + 64 * 1024)
    many = plain[:33] + b"".join(H._chunk(b"tIME", b"\x07\xea\x0c\x03\x00\x00\x00") for _ in range(5000)) + plain[33:]
    assert not header_bounded(many, INLINE)  # more chunk headers than the routing check reads: a worker decides


def test_the_worker_path_still_decodes_them():
    img = decode_image(H.png_with_text_chunks(n=2, inflated=1 << 16), name="text.png")
    assert img.pixels.shape[:2] == (256, 256)


def test_a_jpeg_larger_than_its_pixels_goes_to_a_worker_and_routing_reads_a_prefix():
    """Megabytes of restart markers after a small frame header were walked on the event loop."""
    small = H.jpeg(H.gradient(128, 128))
    assert header_bounded(small, INLINE)
    hostile = H.jpeg_restart_run(small, 200_000)  # 400 kB for 16 kB of pixels
    assert not header_bounded(hostile, INLINE)


def test_runs_of_parameterless_markers_are_skipped_in_one_step(monkeypatch):
    """One Python step per restart marker held the GIL for seconds on millions of them; a run is one regex match."""
    small = H.jpeg(H.gradient(128, 128))
    calls = {"n": 0}
    real = image_headers._PARAMLESS_RUN

    class Counting:
        def match(self, *a):
            calls["n"] += 1
            return real.match(*a)

    monkeypatch.setattr(image_headers, "_PARAMLESS_RUN", Counting())
    hdr = image_headers.jpeg_header(H.jpeg_restart_run(small, 100_000), "rst.jpg")
    assert (hdr.height, hdr.width) == (128, 128)
    assert calls["n"] == 1
    img = decode_image(H.jpeg_restart_run(small, 1000), name="rst.jpg")  # and libjpeg decodes it like the original
    np.testing.assert_array_equal(img.pixels, decode_image(small, name="plain.jpg").pixels)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_first_scan_only_stops_before_the_image_data(n):
    data = H.jpeg(H.gradient(64, 96))
    cut = data[: data.index(b"\xff\xda") + 20]  # the prefix the routing check reads: no end-of-image marker
    hdr = image_headers.jpeg_header(H.jpeg_restart_run(cut, n), "prefix.jpg", first_scan_only=True)
    assert (hdr.height, hdr.width, hdr.scans) == (64, 96, 1)
    with pytest.raises(image_headers.CorruptImageError, match="truncated"):
        image_headers.jpeg_header(cut, "prefix.jpg")
