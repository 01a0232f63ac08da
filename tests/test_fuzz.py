"""Hostile inputs on the path bytes -> decode -> resize -> pack: property tests and a bounded fuzz run.

The property every input must satisfy: packed uint8 pixels of the model's shape, or a typed
ImageError. Never another exception, never a hang (hypothesis deadline, pytest timeout), never
memory out of proportion to the input (bombs are refused from their headers, checked in a child
process's peak RSS).
"""

import io
import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import HAS_PYDICOM, REPO

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from cxr_edge.decode import DecodeLimits, decode_image  # noqa: E402
from cxr_edge.errors import DicomError, ImageError, ImageTooSmallError  # noqa: E402
from cxr_edge.preprocess import PreprocessSpec, pack_source  # noqa: E402

CORPUS = REPO / "fuzz" / "corpus" / "decode"
SEEDS = {p.name: p.read_bytes() for p in sorted(CORPUS.iterdir()) if not p.name.startswith("regress-")}
SPEC = PreprocessSpec(height=32, width=32, mode="rescale")
SPEC_RGB = PreprocessSpec(height=24, width=40, mode="tf", input_channels=3, model_channels=3)
LIMITS = DecodeLimits(max_pixels=4_000_000)
FUZZ = settings(max_examples=int(os.environ.get("CXR_FUZZ_EXAMPLES", 250)), deadline=5000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
COUNTS: dict[str, int] = {}

# Peak RSS of a child process, from /proc (VmHWM belongs to the process's own memory map). Not
# getrusage(): Linux carries ru_maxrss across fork+exec, so a child of this multi-GB pytest process
# would report the parent's size (that is what made the first CI fuzz runs "use" 4.3 GB).
PEAK_RSS = """
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""


def _holds(source, spec=SPEC, tag="other"):
    """The property; numerical warnings count as failures (they were how garbage pixels slipped by)."""
    COUNTS[tag] = COUNTS.get(tag, 0) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            packed, _ = pack_source(source, spec, name="hostile", limits=LIMITS)
        except ImageError as exc:
            assert str(exc) and "hostile" in str(exc)
            return None
    assert packed.shape == (spec.height, spec.width, spec.input_channels) and packed.dtype == np.uint8
    return packed


def test_seed_corpus_decodes():
    assert len(SEEDS) >= 7
    for name, data in SEEDS.items():
        if ".dcm" in name and not HAS_PYDICOM:
            continue
        assert _holds(data) is not None, name


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from([SPEC, SPEC_RGB]))
def test_random_bytes(data, spec):
    _holds(data, spec, "random bytes")


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.data())
def test_truncated_and_corrupted_real_containers(name, data):
    blob = bytearray(SEEDS[name])
    how = data.draw(st.sampled_from(["truncate", "flip", "splice", "zero-run"]))
    if how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 16))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
    elif how == "splice":
        other = SEEDS[data.draw(st.sampled_from(sorted(SEEDS)))]
        cut = data.draw(st.integers(0, len(blob)))
        blob = blob[:cut] + other[data.draw(st.integers(0, len(other))):]
    else:
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i : i + data.draw(st.integers(1, 64))] = bytes(64)
    _holds(bytes(blob), SPEC, f"mutated {name.split('.')[1]}")


dtypes = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64,
                          np.bool_, np.uint32, np.complex64, np.dtype(">u2"), np.dtype(">f8")])


@FUZZ
@given(hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=70)), st.booleans())
def test_arrays_of_any_dtype_shape_and_value(arr, rgb):
    _holds(arr, SPEC_RGB if rgb else SPEC, "arrays")


@pytest.mark.parametrize("shape", [(1, 1), (1, 100000), (100000, 1), (31, 4000), (0, 0), (64, 64, 2), (64, 64, 5)])
def test_extreme_shapes_are_refused_with_a_reason(shape):
    with pytest.raises(ImageError, match="too small|not an image"):
        pack_source(np.zeros(shape, np.uint8), SPEC, name="x")


def test_thin_encoded_image_is_too_small():
    ok, buf = cv2.imencode(".png", np.zeros((1, 5000), np.uint8))
    with pytest.raises(ImageTooSmallError, match="5000x1"):
        decode_image(buf.tobytes())


def _png_declaring(w, h) -> bytes:
    b = bytearray(SEEDS["gray8.png.seed"])
    b[16:24] = struct.pack(">II", w, h)
    return bytes(b)


def _tiff_declaring(w, h) -> bytes:
    b = bytearray(SEEDS["gray16.tif.seed"])
    end = "<" if b[:2] == b"II" else ">"
    (off,) = struct.unpack(end + "I", b[4:8])
    (n,) = struct.unpack(end + "H", b[off : off + 2])
    for k in range(n):
        e = off + 2 + 12 * k
        tag, typ = struct.unpack(end + "HH", b[e : e + 4])
        if tag in (256, 257):
            fmt = end + ("H" if typ == 3 else "I")
            b[e + 8 : e + 8 + struct.calcsize(fmt)] = struct.pack(fmt, w if tag == 256 else h)
    return bytes(b)


def _dicom_rle_bomb(side=30000) -> bytes:
    """A few kB of RLE data declaring side x side 16-bit pixels."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = RLELossless
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.3", "1.2.3.4"
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    seg = bytes([0x81, 0]) * 2000  # each pair expands to 128 bytes
    header = struct.pack("<16I", 2, 64, 64 + len(seg), *([0] * 13))
    ds.PixelData = encapsulate([header + seg + seg])
    ds["PixelData"].VR = "OB"
    f = io.BytesIO()
    ds.save_as(f, enforce_file_format=True)
    return f.getvalue()


def _os2_bmp_declaring(w, h) -> bytes:
    return b"BM" + struct.pack("<IHHI", 126, 0, 0, 26) + struct.pack("<IHHHH", 12, w, h, 1, 24) + bytes(100)


@pytest.mark.parametrize("kind", ["png", "tiff", "bmp-os2", "dicom-rle"])
def test_decompression_bombs_are_refused_from_the_header_in_bounded_memory(kind, tmp_path):
    if kind == "dicom-rle" and not HAS_PYDICOM:
        pytest.skip("pydicom not installed")
    blob = {"png": lambda: _png_declaring(30000, 30000), "tiff": lambda: _tiff_declaring(30000, 30000),
            "bmp-os2": lambda: _os2_bmp_declaring(30000, 30000), "dicom-rle": _dicom_rle_bomb}[kind]()
    assert len(blob) < 20_000
    path = tmp_path / "bomb"
    path.write_bytes(blob)
    code = f"""
import json
from cxr_edge.decode import decode_image
from cxr_edge.errors import ImageError
{PEAK_RSS}
base = peak_mb()
try:
    decode_image({str(path)!r})
    out = "decoded"
except ImageError as exc:
    out = type(exc).__name__ + ": " + str(exc)
print(json.dumps({{"out": out, "extra_mb": peak_mb() - base}}))
"""
    res = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                    check=True).stdout.strip().splitlines()[-1])
    assert res["out"].startswith("ImageTooLargeError") and "30000x30000" in res["out"], res
    assert res["extra_mb"] < 100, res  # before the header checks, the DICOM case took 1.8 GB


def test_dicom_without_pixels_and_truncated_dicom_are_dicom_errors():
    pytest.importorskip("pydicom")
    seed = SEEDS["mono1.dcm.seed"]
    with pytest.raises(DicomError):
        decode_image(seed[: len(seed) // 2], name="half.dcm")
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(seed))
    del ds.PixelData
    f = io.BytesIO()
    ds.save_as(f)
    with pytest.raises(DicomError, match="no pixel data"):
        decode_image(f.getvalue(), name="report.dcm")
    ds = pydicom.dcmread(io.BytesIO(seed))
    ds.Rows = 0
    f = io.BytesIO()
    ds.save_as(f)
    with pytest.raises(DicomError, match="0 image|damaged"):
        decode_image(f.getvalue(), name="zero.dcm")


def test_float_images_spanning_the_whole_double_range_are_packed_not_garbled():
    from cxr_edge.preprocess import to_uint8

    arr = np.tile(np.array([-1e308, 0.0, 1e308]), (40, 14))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_uint8(arr[:1, :3]).tolist() == [[0, 128, 255]]  # was [[0, 0, 0]] with an overflow warning
    assert _holds(arr) is not None


@pytest.mark.skipif(not (REPO / "fuzz" / "fuzz_decode.py").is_file(), reason="fuzz target missing")
def test_bounded_coverage_guided_fuzz_session(tmp_path):
    """atheris (libFuzzer) over the same path, time-boxed; a crash, hang or RSS blow-up fails the test."""
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in SEEDS.items():
        (corpus / name).write_bytes(data)
    # 12 s in the README's suite; CI's slow step runs it again for longer (CXR_FUZZ_SECONDS)
    seconds = int(os.environ.get("CXR_FUZZ_SECONDS", 12))
    # through `sh` (which forks it and waits): libFuzzer reads getrusage's max RSS, which Linux carries
    # over from this pytest process on a direct fork+exec; a child of a small shell starts clean
    proc = subprocess.run(
        ["sh", "-c", '"$@"; exit $?', "sh", sys.executable, str(REPO / "fuzz" / "fuzz_decode.py"), str(corpus),
         f"-max_total_time={seconds}",
         "-rss_limit_mb=1536", "-timeout=10", "-print_final_stats=1", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=seconds + 120, cwd=tmp_path)
    stats = dict(line[len("stat::"):].split(":", 1) for line in proc.stderr.splitlines() if line.startswith("stat::"))
    runs = int(stats.get("number_of_executed_units", "0").strip())
    report = {"runs": runs, "seconds": seconds, "peak_rss_mb": stats.get("peak_rss_mb", "").strip(),
              "new_units": stats.get("new_units_added", "").strip(), "property_examples": COUNTS}
    if os.environ.get("FUZZ_REPORT"):
        Path(os.environ["FUZZ_REPORT"]).write_text(json.dumps(report, indent=2))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert runs > 1000, report


def test_huge_arrays_are_refused_by_shape_before_their_values_are_read():
    """A 1 x 2e9 float array (zero pages, no real memory) must not be scanned for NaN first."""
    code = PEAK_RSS + """
import numpy as np
from cxr_edge.decode import decode_image
from cxr_edge.errors import ImageError
arr = np.zeros((1, 2_000_000_000), np.float32)  # 8 GB virtual, nothing touched
try:
    decode_image(arr)
except ImageError as exc:
    print(type(exc).__name__, int(peak_mb()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert out[0] == "ImageTooLargeError" and int(out[1]) < 1000, out  # scanning first peaked at ~2.5 GB
