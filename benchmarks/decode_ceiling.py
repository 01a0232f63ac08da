"""The decode ceiling: decode-only images/s per format on all usable cores, the decoder in use against the alternatives,
before and after the decoder choices, in one run (issue 32, item 2).

    python benchmarks/decode_ceiling.py [--images 40] [--baseline-rev f480a31] [--work /tmp/cxr-decode-ceiling]
                                        [--out benchmarks/results/decode_ceiling] [--min-seconds 2]

Test sets (built under ``--work`` at run time and reused while their parameters match; never committed: the
cxr-dev images have mixed licences): ``--images`` real chest X-rays picked by a fixed seed from the shared data set,
each as it is ("original": the mixed PNG/JPEG files, 224-4000 px, the issue's end-to-end case) and at the size a
hospital's CR/DX sends (long side 2000-3000 px, upscaled with INTER_CUBIC where smaller, 12-bit with a little
Gaussian noise, sigma 8 of 4095, so that lossless codecs meet the entropy of a real detector rather than of a smooth
upscale). From that 12-bit image: PNG 8-bit (the top 8 bits) and 16-bit (Pillow, zlib level 6), baseline JPEG
(quality 92, libjpeg-turbo), and DICOM DX For Presentation (tests/dicom_studies.py: MONOCHROME2, 16 bits allocated,
12 stored, window 2048/4096) uncompressed (Explicit VR LE), JPEG 2000 lossless and lossy (ratio 15; pydicom with
pylibjpeg-openjpeg) and JPEG-LS lossless (pydicom with pyjpegls).

Timing: a process pool of one worker per usable core (os.sched_getaffinity), forked after the set is in memory, kept
busy with every (decoder, image) pair of a format in one shuffled order, so that load from elsewhere on a shared machine
falls on every decoder alike; each task times its decode alone (the checksum follows, untimed), and images/s = cores /
mean seconds per image. Rounds repeat for decoders with less than ``--min-seconds`` of decoding per core so far.
"threads" rows run decode + resize in a thread pool of the same size in this process, as the runtime's BatchPacker does;
"N threads / 1 thread" notes (a few decoders, 4 images) say whether a decoder releases the GIL.

Identity: each decoder's output against its reference on every image, by shape, dtype and two checksums
(CRC-32 and Adler-32); where they differ the arrays are decoded again here and the largest difference reported.
References: "before" ``decode_image`` (the baseline revision's decode.py and image_headers.py, loaded from git) for the
decode_image rows; the decoder in use for the raw-decoder rows (OpenCV for PNG, simplejpeg for JPEG, pydicom with its
first available plugin for DICOM). Reduced-scale rows (JPEG DCT scale, JPEG 2000 resolution level) are compared after
min-max windowing to 8 bits and INTER_AREA resizing to 224x224 with the full-scale decode put through the same steps.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
DATA = Path(os.environ.get("CXR_DEV_DATA", REPO.parent / "shared" / "data" / "cxr-dev"))
SET_VERSION = 3  # bump when the set recipe changes: a cached set of another version is rebuilt
FORMATS = ("original", "png8", "png16", "jpeg", "dicom_explicit", "dicom_j2k_lossless", "dicom_j2k_lossy", "dicom_jpegls")
TITLES = {
    "original": "Original files (cxr-dev as is: mixed PNG/JPEG, RGB/RGBA/L, 8-bit, 224-4000 px)",
    "png8": "PNG 8-bit gray",
    "png16": "PNG 16-bit gray (12 bits used)",
    "jpeg": "Baseline JPEG (quality 92, gray)",
    "dicom_explicit": "DICOM uncompressed (Explicit VR LE, 16 allocated / 12 stored, window)",
    "dicom_j2k_lossless": "DICOM JPEG 2000 lossless",
    "dicom_j2k_lossy": "DICOM JPEG 2000 lossy (ratio 15)",
    "dicom_jpegls": "DICOM JPEG-LS lossless",
}
EXT = {"png8": ".png", "png16": ".png", "jpeg": ".jpg"}
#: what "after" decodes with, per format (decode.py / image_headers.py of this revision)
AFTER = {
    "original": "PNG structure check confirmed by libdeflate (imagecodecs); decoders unchanged",
    "png8": "structure check confirmed by libdeflate; OpenCV decodes (no faster identical decoder)",
    "png16": "libpng via imagecodecs + structure check confirmed by libdeflate",
    "jpeg": "unchanged: simplejpeg (no faster identical decoder)",
    "dicom_explicit": "rescale + window as a table of every stored value, one lookup per pixel",
    "dicom_j2k_lossless": "decoder unchanged (pylibjpeg-openjpeg); rescale + window as a table",
    "dicom_j2k_lossy": "decoder unchanged (pylibjpeg-openjpeg); rescale + window as a table",
    "dicom_jpegls": "CharLS (pyjpegls) instead of pylibjpeg-libjpeg; rescale + window as a table",
}
TARGET = 224


# ---------------------------------------------------------------------------------------------------- the test sets

def _pick(n: int, seed: int) -> list[Path]:
    """``n`` real images by a fixed seed (the sorted file list, so every machine picks the same ones)."""
    files = sorted(p for p in DATA.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file())
    if not files:
        raise SystemExit(f"no images under {DATA} (set CXR_DEV_DATA)")
    rng = np.random.default_rng(seed)
    return [files[i] for i in sorted(rng.choice(len(files), size=min(n, len(files)), replace=False))]


def _hospital_size(src: Path, i: int, seed: int) -> np.ndarray:
    """The image as 12-bit values at 2000-3000 px on the long side (a CR/DX detector's size)."""
    import cv2

    gray = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    rng = np.random.default_rng([seed, i])
    long_side = int(rng.integers(2000, 3001))
    h, w = gray.shape
    s = long_side / max(h, w)
    size = (max(64, round(w * s)), max(64, round(h * s)))
    big = cv2.resize(gray, size, interpolation=cv2.INTER_CUBIC if s > 1 else cv2.INTER_AREA)
    v = big.astype(np.float32) * (4095 / 255) + rng.normal(0, 8, big.shape).astype(np.float32)
    return np.clip(np.rint(v), 0, 4095).astype(np.uint16)


def _write_one(job: tuple[int, str, str, int]) -> dict:
    """Every format of one image (run in a worker: encoding JPEG 2000 takes about a second an image)."""
    import dicom_studies as S
    import simplejpeg
    from PIL import Image
    from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless

    i, src, work, seed = job
    v12 = _hospital_size(Path(src), i, seed)
    v8 = (v12 >> 4).astype(np.uint8)
    out = Path(work)
    files = {}

    def put(fmt: str, data: bytes) -> None:
        p = out / fmt / f"{i:03d}{EXT.get(fmt, '.dcm')}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        files[fmt] = str(p)

    for fmt, arr in (("png8", v8), ("png16", v12)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
        put(fmt, buf.getvalue())
    put("jpeg", simplejpeg.encode_jpeg(np.ascontiguousarray(v8[:, :, None]), quality=92, colorspace="GRAY"))
    for fmt, syntax, kw in (("dicom_explicit", None, {}), ("dicom_j2k_lossless", JPEG2000Lossless, {}),
                            ("dicom_j2k_lossy", JPEG2000, {"j2k_cr": [15]}), ("dicom_jpegls", JPEGLSLossless, {})):
        ds = S._dataset(v12, sop_class=S.DX_PRESENTATION, study_uid=S._uid("s", i), series_uid=S._uid("se", i),
                        sop_uid=S._uid("i", i, fmt), patient_id=f"P{i:03d}", modality="DX", view="PA", bits=16, mono1=False)
        if syntax is not None:
            plugin = "pyjpegls" if syntax == JPEGLSLossless else "pylibjpeg"
            ds.compress(syntax, encoding_plugin=plugin, generate_instance_uid=False, **kw)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        put(fmt, buf.getvalue())
    return {"index": i, "source": src, "shape": list(v12.shape), "files": files}


def build_sets(work: Path, n: int, seed: int, workers: int) -> dict:
    """The sets under ``work`` (reused when the same recipe and images made them), built in parallel."""
    picked = _pick(n, seed)
    key = {"version": SET_VERSION, "seed": seed, "sources": [str(p) for p in picked]}
    manifest = work / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old.get("key") == key and all(Path(f).exists() for it in old["items"] for f in it["files"].values()):
            old["built_s"] = 0.0
            return old
    t = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as ex:
        items = list(ex.map(_write_one, [(i, str(p), str(work), seed) for i, p in enumerate(picked)]))
    for it in items:
        it["files"]["original"] = it["source"]
    res = {"key": key, "items": items, "built_s": round(time.perf_counter() - t, 1)}
    manifest.write_text(json.dumps(res, indent=1))
    return res


# ---------------------------------------------------------------------------------------------------- the decoders

@dataclass
class Dec:
    """One way to decode a format: ``fn(bytes) -> array``, compared with decoder ``ref``: exactly, or (``at224``)
    after 8-bit windowing and resizing to 224 px, against ``ref``'s output put through the same steps."""

    name: str
    fn: Callable[[bytes], np.ndarray]
    ref: str | None = None
    at224: bool = False
    note: str = ""
    group: str = "alternative"  # before / after / resize-before / resize-after / alternative / reduced / header
    keep224: bool = False  # also keep the output at 224 px (the reference of reduced-scale rows)
    results: dict = field(default_factory=dict)


def _baseline_modules(rev: str):
    """``decode.py`` and ``image_headers.py`` as they were at ``rev``, imported inside the package, the baseline decode
    importing the baseline headers (its ``from .image_headers import`` is pointed at them)."""
    tmp = Path(tempfile.mkdtemp())
    mods = {}
    for name in ("image_headers", "decode"):
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:cxr_edge/{name}.py"], check=True,
                             capture_output=True, text=True).stdout
        src = src.replace("from .image_headers import", "from ._image_headers_baseline import")
        path = tmp / f"_{name}_baseline.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"cxr_edge._{name}_baseline", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods["decode"], mods["image_headers"]


def _to224(arr: np.ndarray) -> np.ndarray:
    """What the model gets from a decoded array: 8 bits (min-max for wider data), gray, INTER_AREA to 224x224."""
    from cxr_edge.preprocess import PreprocessSpec, pack_image

    return pack_image(arr, PreprocessSpec(TARGET, TARGET, "rescale", 1, 1))


def _frame(data: bytes) -> bytes:
    """The first frame's codestream of an encapsulated DICOM object (what a direct decoder gets)."""
    from pydicom import dcmread
    from pydicom.encaps import generate_frames

    ds = dcmread(io.BytesIO(data))
    return next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))


def _pydicom(plugin: str | None) -> Callable[[bytes], np.ndarray]:
    def run(data: bytes) -> np.ndarray:
        from pydicom import dcmread

        ds = dcmread(io.BytesIO(data))
        if plugin:
            ds.pixel_array_options(decoding_plugin=plugin)
        return ds.pixel_array

    return run


def _pillow_j2k(reduce: int) -> Callable[[bytes], np.ndarray]:
    def run(data: bytes) -> np.ndarray:
        from PIL import Image
        from pydicom import dcmread
        from pydicom.encaps import generate_frames

        ds = dcmread(io.BytesIO(data))
        im = Image.open(io.BytesIO(next(generate_frames(ds.PixelData, number_of_frames=1))))
        im.reduce = reduce  # JPEG 2000 resolution levels: 1/2**reduce per side, decoded at that size
        im.load()
        arr = np.asarray(im)
        if im.mode.startswith("I;16") and int(ds.BitsStored) < 16:  # Pillow scales 12-bit samples up to 16 bits
            arr = arr >> (16 - int(ds.BitsStored))
        return arr

    return run


def _simplejpeg_scaled(r: int) -> Callable[[bytes], np.ndarray]:
    def run(data: bytes) -> np.ndarray:
        import simplejpeg

        h, w = simplejpeg.decode_jpeg_header(data)[:2]
        # as decode.py asks for it: min_factor alone leaves libjpeg-turbo at full scale
        return simplejpeg.decode_jpeg(data, "GRAY", min_factor=r, min_height=-(-h // r), min_width=-(-w // r))[:, :, 0]

    return run


def decoders(fmt: str, base, now) -> list[Dec]:
    """Every decoder of ``fmt`` measured here: decode_image before/after, + resize, and the alternatives."""
    import cv2

    from cxr_edge import preprocess

    spec = preprocess.PreprocessSpec(TARGET, TARGET, "rescale", 1, 1)
    out = [
        Dec("decode_image (before)", lambda d: base.decode_image(d, channels=1).pixels, group="before"),
        Dec("decode_image (after)", lambda d: now.decode_image(d, channels=1).pixels, "decode_image (before)",
            group="after", note=AFTER[fmt]),
        Dec("decode_image + resize 224 (before)",
            lambda d: preprocess.pack_image(base.decode_image(d, channels=1).pixels, spec), group="resize-before",
            note="what the model gets (preprocess.pack_source: full-scale decode, no passed decode gate), gray, INTER_AREA"),
        Dec("decode_image + resize 224 (after)", lambda d: preprocess.pack_source(d, spec)[0],
            "decode_image + resize 224 (before)", group="resize-after"),
    ]
    cv_flags = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
    if fmt in ("png8", "png16"):
        from cxr_edge import image_headers

        ref = "cv2.imdecode"
        out += [Dec(ref, lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv_flags),
                    note=f"OpenCV {cv2.__version__} (its bundled libpng): the decoder in use (before)"),
                Dec("imagecodecs.png_decode", lambda d: _ic().png_decode(d), ref, note="libpng via imagecodecs"),
                Dec("pyspng.load", lambda d: _squeeze(__import__("pyspng").load(d)), ref,
                    note="libspng; 16-bit gray comes as gray+alpha (alpha dropped here)"),
                Dec("PNG structure check (before)", lambda d: _none(base_headers.png_header(d, "x")), group="header",
                    note="image_headers.png_header: chunk walk + bounded inflate of the image data, part of decode_image"),
                Dec("PNG structure check (after)", lambda d: _none(image_headers.png_header(d, "x")), group="header")]
        if fmt == "png8":
            out.append(Dec("imagecodecs.spng_decode", lambda d: _squeeze(_ic().spng_decode(d)), ref,
                           note="libspng via imagecodecs (no 16-bit gray output)"))
    elif fmt == "jpeg":
        import simplejpeg

        ref = "simplejpeg"
        out += [Dec(ref, lambda d: simplejpeg.decode_jpeg(d, "GRAY")[:, :, 0],
                    note="libjpeg-turbo: the decoder in use (strict mode in decode_image)"),
                Dec("cv2.imdecode", lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv_flags), ref,
                    note="libjpeg-turbo in OpenCV; prints libjpeg's warnings but decodes damaged files as grey"),
                Dec("imagecodecs.jpeg8_decode", lambda d: _ic().jpeg8_decode(d), ref),
                Dec("pylibjpeg-libjpeg", lambda d: __import__("libjpeg").decode(d), ref, note="Thomas Richter's libjpeg")]
        out[4].keep224 = True
        for r in (2, 4, 8):
            out.append(Dec(f"simplejpeg 1/{r} scale", _simplejpeg_scaled(r), ref, at224=True, group="reduced",
                           note="libjpeg-turbo DCT scaling (decode_image's jpeg_reduction, behind the decode gate)"))
    elif fmt == "dicom_explicit":
        ref = "pydicom (native)"
        out += [Dec(ref, _pydicom(None), note="pydicom's own native decoder: the decoder in use"),
                Dec("numpy.frombuffer", _native_frombuffer, ref, note="header parse + frombuffer, no unused-bit masking")]
    elif fmt.startswith("dicom_j2k"):
        ref = "pydicom + pylibjpeg"
        out += [Dec(ref, _pydicom("pylibjpeg"), note="pylibjpeg-openjpeg (OpenJPEG 2.5): the decoder in use (pydicom's first plugin)"),
                Dec("pydicom + pillow", _pydicom("pillow"), ref, note="Pillow's OpenJPEG"),
                Dec("imagecodecs.jpeg2k_decode", lambda d: _ic().jpeg2k_decode(_frame(d)), ref,
                    note="OpenJPEG via imagecodecs, on the frame (DICOM parse included)")]
        if fmt == "dicom_j2k_lossy":  # lossless: "pydicom + pillow" is the full-resolution Pillow time (within 2 %)
            out.append(Dec("Pillow J2K, full resolution", _pillow_j2k(0), ref,
                           note="Pillow's OpenJPEG on the frame, as the reduced rows below (DICOM parse included)"))
        out[4].keep224 = True
        for r in (1, 2):
            out.append(Dec(f"Pillow J2K level {r} (1/{2 ** r} per side)", _pillow_j2k(r), ref, at224=True, group="reduced",
                           note="OpenJPEG decoding only the coarser wavelet levels (Pillow's reduce); imagecodecs and "
                                "pylibjpeg-openjpeg expose no level in these versions"))
    elif fmt == "dicom_jpegls":
        ref = "pydicom + pylibjpeg"
        out += [Dec(ref, _pydicom("pylibjpeg"), note="pylibjpeg-libjpeg: the decoder in use (first plugin)"),
                Dec("pydicom + pyjpegls", _pydicom("pyjpegls"), ref, note="CharLS 2 via pyjpegls"),
                Dec("imagecodecs.jpegls_decode", lambda d: _ic().jpegls_decode(_frame(d)), ref,
                    note="CharLS via imagecodecs, on the frame (DICOM parse included)")]
    return out


def _ic():
    import imagecodecs

    return imagecodecs


def _squeeze(a: np.ndarray) -> np.ndarray:
    return a[:, :, 0] if a.ndim == 3 and a.shape[2] in (1, 2) else a


def _none(_) -> np.ndarray:
    return np.zeros(0, np.uint8)


def _native_frombuffer(data: bytes) -> np.ndarray:
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data))
    dt = np.uint16 if ds.BitsAllocated == 16 else np.uint8
    return np.frombuffer(ds.PixelData, dt, count=ds.Rows * ds.Columns).reshape(ds.Rows, ds.Columns)


# ---------------------------------------------------------------------------------------------------- measuring

_DATA: list[bytes] = []
_DECS: dict[str, Dec] = {}
base_headers = None  # the baseline image_headers module (PNG structure check "before")


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    try:
        import imagecodecs

        sums = f"{imagecodecs.deflate_crc32(a):08x}{imagecodecs.deflate_adler32(a):08x}"
    except ImportError:
        sums = hashlib.blake2b(a.tobytes(), digest_size=8).hexdigest()
    return f"{a.shape}:{a.dtype}:{sums}"


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one image per core: the pool is the parallelism


def _task(job: tuple[str, int, bool]):
    """Decode image ``i`` with decoder ``name`` (timed); with ``check``, then its checksum and 224 px array (untimed)."""
    name, i, check = job
    dec = _DECS[name]
    t = time.perf_counter()
    try:
        arr = dec.fn(_DATA[i])
    except Exception as exc:  # a decoder that cannot read an image is a result too
        return name, i, time.perf_counter() - t, f"error: {type(exc).__name__}: {exc}"[:200], None
    dt = time.perf_counter() - t
    if not check:
        return name, i, dt, None, None
    small = _to224(arr) if dec.at224 or dec.keep224 else None
    return name, i, dt, None if dec.at224 else _digest(arr), small


def _measure(pool, decs: list[Dec], n: int, workers: int, min_seconds: float, seed: int) -> None:
    """Rounds over every (decoder, image) pair in a shuffled order, so that every decoder of the format meets the same
    load from elsewhere on a shared machine; the first round also checks the outputs. Further rounds, of the decoders
    with less than ``min_seconds`` of work per core so far, until each has it (slow decoders: the first round)."""
    times: dict[str, list[float]] = {d.name: [] for d in decs}
    rng = np.random.default_rng(seed)
    todo = decs
    check = True
    while todo:
        jobs = [(d.name, i, check) for d in todo for i in range(n)]
        order = [jobs[k] for k in rng.permutation(len(jobs))]
        for name, i, dt, digest, small in pool.map(_task, order):
            times[name].append(dt)
            if check:
                res = _DECS[name].results
                res.setdefault("outputs", [None] * n)[i] = digest
                res.setdefault("outputs224", [None] * n)[i] = small
        check = False
        todo = [d for d in todo if sum(times[d.name]) / workers < min_seconds]
    for dec in decs:
        t = times[dec.name]
        dec.results.update({"images_per_s": workers / float(np.mean(t)), "ms_per_image_per_core": 1000 * float(np.mean(t)),
                            "rounds": len(t) // n})


def _threads(pair: list[Dec], n: int, workers: int) -> None:
    """Images/s of each decoder of ``pair`` in a thread pool of ``workers`` threads in this process (the runtime's
    BatchPacker way), over the first ``n`` images, in ABBA order so that drifting load falls on both alike."""
    spent = {d.name: 0.0 for d in pair}
    with ThreadPoolExecutor(workers) as ex:
        for dec in pair:
            list(ex.map(dec.fn, _DATA[:workers]))  # warm
        for dec in [*pair, *pair[::-1]]:
            t = time.perf_counter()
            list(ex.map(dec.fn, _DATA[:n]))
            spent[dec.name] += time.perf_counter() - t
    for dec in pair:
        dec.results["threads_images_per_s"] = 2 * n / spent[dec.name]
        dec.results["threads_images"] = n


#: decoders whose thread scaling is probed (does the decoder release the GIL?), per format
GIL_PROBE = {"png16": ("cv2.imdecode", "imagecodecs.png_decode"), "jpeg": ("simplejpeg",),
             "dicom_j2k_lossy": ("pydicom + pylibjpeg", "imagecodecs.jpeg2k_decode"),
             "dicom_jpegls": ("pydicom + pyjpegls", "imagecodecs.jpegls_decode")}


def _gil(dec: Dec, n: int, workers: int) -> None:
    """Images/s of ``dec`` in 1 thread and in ``workers`` threads of this process over the first ``n`` images (ABBA):
    a ratio near ``workers`` means the decoder releases the GIL, near 1 that threads cannot use the other cores."""
    spent = {1: 0.0, workers: 0.0}
    for k in (1, workers):
        with ThreadPoolExecutor(k) as ex:
            list(ex.map(dec.fn, _DATA[:k]))  # warm
    for k in (1, workers, workers, 1):
        with ThreadPoolExecutor(k) as ex:
            t = time.perf_counter()
            list(ex.map(dec.fn, _DATA[:n]))
            spent[k] += time.perf_counter() - t
    dec.results["gil_thread_scaling"] = round(spent[1] / spent[workers], 2)


def _compare(decs: dict[str, Dec], n: int) -> None:
    """Identity (or the 224 px difference) of every decoder against its reference, image by image."""
    for dec in decs.values():
        outs = dec.results["outputs"]
        errors = [o for o in outs if isinstance(o, str) and o.startswith("error")]
        dec.results["errors"] = len(errors)
        if errors:
            dec.results["first_error"] = errors[0]
        if dec.ref is None:
            dec.results["identical"] = None
            continue
        if dec.at224:
            pairs = zip(dec.results["outputs224"], decs[dec.ref].results["outputs224"], strict=True)
            diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in pairs
                     if isinstance(a, np.ndarray) and isinstance(b, np.ndarray)]
            dec.results.update(identical=False, max_diff_224=int(max(d.max() for d in diffs)),
                               mean_diff_224=round(float(np.mean([d.mean() for d in diffs])), 3),
                               p99_diff_224=float(np.percentile(np.concatenate([d.ravel() for d in diffs]), 99)))
            continue
        ref_outs = decs[dec.ref].results["outputs"]
        differ = [i for i in range(n) if outs[i] != ref_outs[i]]
        dec.results["identical"] = not differ and not errors
        dec.results["images_differing"] = len(differ)
        if differ:  # decode both again here, for the size of the difference (at most three images)
            worst = 0.0
            for i in differ[:3]:
                try:
                    a, b = dec.fn(_DATA[i]), decs[dec.ref].fn(_DATA[i])
                    worst = max(worst, float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
                                if a.shape == b.shape else float("inf"))
                except Exception as exc:
                    dec.results["diff_error"] = f"{type(exc).__name__}: {exc}"[:200]
            dec.results["max_diff"] = worst


def run_format(fmt: str, items: list[dict], base, now, workers: int, a) -> list[Dec]:
    global _DATA, _DECS
    _DATA = [Path(it["files"][fmt]).read_bytes() for it in items]
    decs = decoders(fmt, base, now)
    if fmt == "original":
        decs = [d for d in decs if d.group in ("before", "after", "resize-before", "resize-after")]
    _DECS = {d.name: d for d in decs}
    n = len(_DATA)
    t = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_worker_init) as pool:
        list(pool.map(_task, [(decs[0].name, i % n, False) for i in range(workers)]))  # workers up and warm
        _measure(pool, decs, n, workers, a.min_seconds, a.seed)
    if not a.no_threads:
        pair = [d for d in decs if d.group in ("resize-before", "resize-after")]
        fast = max(d.results["ms_per_image_per_core"] for d in pair) < 30  # every image: the set costs seconds
        _threads(pair, n if fast else min(n, a.thread_images), workers)
        for name in GIL_PROBE.get(fmt, ()):
            _gil(_DECS[name], min(n, 4), workers)
    _compare(_DECS, n)
    for d in decs:
        d.results.pop("outputs", None)
        d.results.pop("outputs224", None)
        print(f"  {fmt:20s} {d.name:42s} {d.results['images_per_s']:8.2f} img/s", flush=True)
    print(f"{fmt}: {time.perf_counter() - t:.0f} s", flush=True)
    return decs


# ---------------------------------------------------------------------------------------------------- reporting

def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("opencv-python-headless", "simplejpeg", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
              "pyjpegls", "imagecodecs", "pyspng", "pillow", "numpy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def _ident(r: dict, dec: Dec) -> str:
    if dec.at224:
        return f"max {r['max_diff_224']} / mean {r['mean_diff_224']} (of 255, at 224 px)"
    if r.get("identical") is None:
        return "reference" if dec.group not in ("header",) else "-"
    if r["identical"]:
        return "yes"
    if r.get("errors"):
        return f"no: {r['errors']} error(s): {r.get('first_error', '')}"
    return f"no: {r['images_differing']} image(s) differ, max {r.get('max_diff', '?'):g}"


def write_report(res: dict, out: Path) -> str:
    lines = [f"# Decode ceiling per format ({res['machine'].get('cpu', '?')}, {res['workers']} usable cores)", "",
             f"Command: `{res['command']}` (under `flock /tmp/cxr-bench.lock`), {res['date']}; baseline (\"before\") = "
             f"revision {res['baseline_rev']}'s decode.py + image_headers.py, measured in the same run. "
             f"{res['images']} images per set (sizes: {res['sizes']}); set built in {res['built_s']} s "
             "(0 = reused from --work); whole run {:.0f} s.".format(res["run_s"]), "",
             "img/s: decode only (unless the row says more) on all cores: a process pool of one worker per core kept "
             "busy with every (decoder, image) pair of the format in one shuffled order, img/s = cores / mean seconds "
             "per image (ms/img: that mean, one image on one core while every core is busy). rounds: passes over the "
             "set (more where one took under --min-seconds per core). threads: decode + resize in a thread pool of "
             "the same size in one process (the runtime's BatchPacker), every image where one costs under 30 ms, else the first {}, ABBA order. identical: every "
             "image's output equal to the reference's (shape, dtype, CRC-32 + Adler-32; where not, the largest "
             "difference of up to three such images); reduced-scale rows: the difference after min-max windowing to "
             "8 bits and INTER_AREA to 224x224, against the reference's full decode through the same steps.".format(
                 res["thread_images"]), ""]
    summary = ["## Before / after (decode_image, img/s on all cores)", "",
               "| format | before | after | x | identical | decode+resize 224 before | after | threads before | after |",
               "|---|---|---|---|---|---|---|---|---|"]
    for fmt, decs in res["formats"].items():
        by = {d["name"]: d for d in decs}
        b, a = by["decode_image (before)"], by["decode_image (after)"]
        rb, ra = by["decode_image + resize 224 (before)"], by["decode_image + resize 224 (after)"]
        thr = [f"{r.get('threads_images_per_s', float('nan')):.1f}" for r in (rb, ra)]
        thr[0] += f" ({rb.get('threads_images', '-')} img)"
        summary.append(f"| {fmt} | {b['images_per_s']:.1f} | {a['images_per_s']:.1f} | "
                       f"{a['images_per_s'] / b['images_per_s']:.2f} | {'yes' if a['identical'] else 'NO'} | "
                       f"{rb['images_per_s']:.1f} | {ra['images_per_s']:.1f} | {thr[0]} | {thr[1]} |")
    lines += summary + [""]
    for fmt, decs in res["formats"].items():
        lines += [f"## {TITLES[fmt]}", "", "| decoder | img/s | ms/img | rounds | identical? | notes |",
                  "|---|---|---|---|---|---|"]
        for d in decs:
            dec = Dec(d["name"], lambda x: x, d["ref"], d["at224"], d["note"], d["group"])
            name = f"**{d['name']}**" if d["group"] in ("before", "after") else d["name"]
            note = d["note"]
            if "gil_thread_scaling" in d:
                note += f"{'; ' if note else ''}{res['workers']} threads / 1 thread: x{d['gil_thread_scaling']:.2f}"
            lines.append(f"| {name} | {d['images_per_s']:.1f} | {d['ms_per_image_per_core']:.1f} | {d['rounds']} | "
                         f"{_ident(d, dec)} | {note} |")
        lines.append("")
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in res["versions"].items()), ""]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def plot(res: dict, out: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmts = list(res["formats"])
    fig, axes = plt.subplots(len(fmts), 1, figsize=(10, 2.2 + 0.34 * sum(len(v) for v in res["formats"].values())),
                             gridspec_kw={"height_ratios": [len(res["formats"][f]) for f in fmts]})
    colours = {"before": "#c0504d", "after": "#4f81bd", "resize-before": "#e6a1a0", "resize-after": "#a7c0de",
               "alternative": "#9bbb59", "reduced": "#f2c85b", "header": "#bbbbbb"}
    for ax, fmt in zip(np.atleast_1d(axes), fmts, strict=True):
        decs = res["formats"][fmt]
        ys = np.arange(len(decs))
        ax.barh(ys, [d["images_per_s"] for d in decs], color=[colours[d["group"]] for d in decs])
        ax.set_yticks(ys, [d["name"] for d in decs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(TITLES[fmt], fontsize=8, loc="left")
        for y, d in zip(ys, decs, strict=True):
            ax.text(d["images_per_s"], y, f" {d['images_per_s']:.1f}", va="center", fontsize=6)
    np.atleast_1d(axes)[-1].set_xlabel(f"images/s on {res['workers']} cores (log)")
    fig.tight_layout()
    fig.savefig(out / "decode_ceiling.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--seed", type=int, default=32)
    ap.add_argument("--baseline-rev", default="f480a31")
    ap.add_argument("--work", default="/tmp/cxr-decode-ceiling")
    ap.add_argument("--out", default="benchmarks/results/decode_ceiling")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="decode seconds per core per decoder (at least one round)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--no-threads", action="store_true", help="skip the thread-pool rows")
    ap.add_argument("--thread-images", type=int, default=6, help="images per thread-pool measurement")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()

    from cxr_edge import decode as now
    from cxr_edge.cpu_isa import isa_facts

    global base_headers
    base, base_headers = _baseline_modules(a.baseline_rev)
    workers = len(os.sched_getaffinity(0))
    sets = build_sets(Path(a.work), a.images, a.seed, workers)
    items = sets["items"]
    print(f"{len(items)} images per set, built in {sets['built_s']} s", flush=True)
    for m in ("pydicom.pixels.decoders", "openjpeg", "libjpeg", "jpeg_ls", "pyspng", "PIL.Jpeg2KImagePlugin"):
        __import__(m)  # imported before the workers fork, so no first decode pays for it
    sides = sorted(max(it["shape"]) for it in items)
    res = {"machine": isa_facts(), "workers": workers, "baseline_rev": a.baseline_rev, "images": len(items),
           "sizes": f"long side {sides[0]}-{sides[-1]} px (median {sides[len(sides) // 2]})",
           "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "built_s": sets["built_s"], "versions": _versions(),
           "thread_images": min(a.thread_images, len(items)), "formats": {}}
    for fmt in a.formats.split(","):
        decs = run_format(fmt, items, base, now, workers, a)
        res["formats"][fmt] = [{"name": d.name, "ref": d.ref, "at224": d.at224, "note": d.note, "group": d.group,
                                **d.results} for d in decs]
    res["run_s"] = round(time.perf_counter() - t0, 1)
    out = REPO / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(write_report(res, out))
    plot(res, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
