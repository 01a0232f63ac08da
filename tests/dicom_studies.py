"""Builders of DICOM test studies for the DICOM node (pynetdicom Storage SCP), made from the real chest X-rays.

Everything is written under a folder the caller passes (a pytest ``tmp_path``): the cxr-dev images have mixed
licences, so neither they nor DICOM made from them may ever be committed (see ``../shared/data/cxr-dev/README.md``).

Who makes what: pydicom builds every uncompressed dataset (a DX or CR object with all its type-1 attributes, which
``img2dcm`` cannot write: it only knows Secondary Capture and photo classes) and the JPEG 2000 one (pylibjpeg-openjpeg);
DCMTK transcodes the rest (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``, ``dcmconv +td``) and ``img2dcm`` makes the
colour Secondary Capture. Each instance says what the node must do with it (``expect``):

- ``screen``: a frontal (PA/AP) DX/CR image the node must screen;
- ``skip``: stored, but the rules must skip it with a reason (lateral, no view, multi-frame, no pixels, colour SC);
- ``refuse``: the node must answer a failure status at C-STORE (pixel data shorter than the header says, file cut
  in the middle of the pixel data, a 60,000 x 60,000 header on a few bytes).
"""

from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from conftest import REAL_DATA
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: the DCMTK tools some kinds need; tests that build those kinds skip without them
DCMTK_TOOLS = ("img2dcm", "dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv")
HAS_DCMTK = all(shutil.which(t) for t in DCMTK_TOOLS)

#: kind -> what the node must do with it (for the kinds that carry a real, frontal DX/CR image this holds for the
#: defaults modality="DX", view="PA"; make_instance works the expectation out from the arguments)
EXPECT = {
    "pa": "screen",
    "ap": "screen",
    "lateral": "skip",
    "unknown_view": "skip",
    "mono1": "screen",
    "16bit": "screen",
    "jpeg2000": "screen",
    "jpegls": "screen",
    "jpeg_baseline": "screen",
    "rle": "screen",
    "deflated": "screen",
    "multiframe": "skip",
    "no_pixels": "skip",
    "sc_colour": "skip",
    "corrupt": "refuse",
    "truncated": "refuse",
    "hostile_size": "refuse",
}
KINDS = tuple(EXPECT)

#: encodings make_frontal_instances (and make_instance's ``encoding``) take for the plain image kinds
ENCODINGS = ("explicit", "implicit", "jpeg_baseline", "jpegls", "rle", "jpeg2000", "deflated")
_VIEW_CODES = {
    "PA": ("399066004", "SCT", "postero-anterior"),
    "AP": ("399348003", "SCT", "antero-posterior"),
    "LL": ("399173006", "SCT", "left lateral"),
}
_VIEW_OF_KIND = {"pa": "PA", "ap": "AP", "lateral": "LL", "unknown_view": None}
_IMAGE_EXTS = {".png", ".jpg", ".jpeg"}
STUDY_DATE = "20240115"


@dataclass(frozen=True)
class TestInstance:
    """One DICOM file written for a test, with the identifiers and outcome a test checks the node against."""

    __test__ = False  # a helper, not a pytest test class

    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    kind: str
    expect: str  # "screen", "skip" or "refuse"
    transfer_syntax: str


def source_images(source_dir: Path = REAL_DATA) -> list[Path]:
    """The real images (all class folders, sorted) so a seed picks the same files on every machine."""
    files = sorted(p for p in Path(source_dir).rglob("*") if p.suffix.lower() in _IMAGE_EXTS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no PNG/JPEG images under {source_dir}")
    return files


@lru_cache(maxsize=64)
def _gray(src: str, max_side: int) -> np.ndarray:
    """Grayscale uint8, longest side <= max_side (INTER_AREA): sources are RGB/RGBA/L PNGs and JPEGs up to 4000 px."""
    img = cv2.imread(src, cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"cannot read image {src}")
    h, w = img.shape
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    img.setflags(write=False)
    return img


def _run(*cmd: str | Path) -> None:
    """Run a DCMTK tool, raising with its stderr (not a bare CalledProcessError) so a failing build says why."""
    if shutil.which(str(cmd[0])) is None:
        raise RuntimeError(f"{cmd[0]} not found: install DCMTK (apt-get install dcmtk)")
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip()}")


def _uid(*parts: object) -> str:
    """A UID derived from its parts (pydicom hashes entropy_srcs), so reruns with the same seed give identical files."""
    return str(generate_uid(entropy_srcs=["cxr-edge-tests", *map(str, parts)]))


def _dataset(
    pixels: np.ndarray,
    *,
    sop_class: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    patient_id: str,
    modality: str,
    view: str | None,
    bits: int,
    mono1: bool,
) -> Dataset:
    """A DX (For Presentation), CR or Secondary Capture dataset with every type-1/type-2 attribute of its IOD, uncompressed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "CXR_EDGE_TEST"

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = ""
    ds.Modality = modality
    if sop_class == SECONDARY_CAPTURE:
        ds.ConversionType = "WSD"
    ds.Manufacturer = "cxr-edge tests"
    ds.ReferringPhysicianName = ""
    ds.PatientName = "Test^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "CHEST"
    if view is not None:
        ds.ViewPosition = view
    elif sop_class == CR_IMAGE:
        ds.ViewPosition = ""  # type 2 in the CR Series module: present, empty = unknown
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["P", "F"] if view == "LL" else ["L", "F"]  # type 1C in DX, known even without a view
    maxval = (1 << (12 if bits == 16 else 8)) - 1
    if sop_class == DX_PRESENTATION:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if mono1 else -1  # bone is bright on screen: high values = less beam
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "INVERSE" if mono1 else "IDENTITY"
        ds.LossyImageCompression = "00"
        ds.DetectorType = ""
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
        ds.AcquisitionContextSequence = Sequence()
        ds.PositionerType = ""
        if view in _VIEW_CODES:  # codes of CID 4010 "DX View" (as PixelMed lists them)
            code = _code(*_VIEW_CODES[view])
            code.ViewModifierCodeSequence = Sequence()
            ds.ViewCodeSequence = Sequence([code])
        ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = bits
    ds.BitsStored = 12 if bits == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if sop_class == DX_PRESENTATION:
        ds.ImagerPixelSpacing = [f"{430 / max(pixels.shape[-2:]):.4f}"] * 2  # a 43 cm detector, whatever the size
    ds.WindowCenter = str((maxval + 1) // 2)
    ds.WindowWidth = str(maxval + 1)
    data = pixels.astype("<u2" if bits == 16 else np.uint8).tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item (Code Value, Coding Scheme Designator, Code Meaning)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _save(ds: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian) -> None:
    """Write a Part 10 file (preamble, meta header with group length) in the given uncompressed transfer syntax."""
    ds.file_meta.TransferSyntaxUID = syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _encode(ds: Dataset, out: Path, encoding: str) -> None:
    """Write ds to out in one of ENCODINGS: pydicom for the uncompressed ones and JPEG 2000, DCMTK for the others."""
    if encoding in ("explicit", "implicit"):
        _save(ds, out, ExplicitVRLittleEndian if encoding == "explicit" else ImplicitVRLittleEndian)
        return
    if encoding == "jpeg2000":  # pydicom 3 + pylibjpeg-openjpeg (DCMTK has no free JPEG 2000 codec)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        _save(ds, out, JPEG2000Lossless)
        return
    raw = out.with_name(out.name + ".raw.dcm")
    _save(ds, raw)
    try:
        if encoding == "jpeg_baseline":  # DCMTK; +un keeps the SOP Instance UID (lossy would get a new one)
            _run("dcmcjpeg", "+eb", "+un", raw, out)
        elif encoding == "jpegls":  # DCMTK, lossless
            _run("dcmcjpls", "+el", "+un", raw, out)
        elif encoding == "rle":  # DCMTK
            _run("dcmcrle", "+un", raw, out)
        elif encoding == "deflated":  # DCMTK: Deflated Explicit VR Little Endian
            _run("dcmconv", "+td", raw, out)
        else:
            raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    finally:
        raw.unlink(missing_ok=True)


def _sc_colour(gray: np.ndarray, out: Path, *, study_uid: str, series_uid: str, sop_uid: str, patient_id: str) -> None:
    """A colour (RGB JPEG, Modality OT) Secondary Capture via DCMTK img2dcm, which keeps the JPEG as it is (JPEG Baseline)."""
    jpg = out.with_name(out.name + ".src.jpg")
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(jpg), cv2.applyColorMap(np.ascontiguousarray(gray), cv2.COLORMAP_JET), [cv2.IMWRITE_JPEG_QUALITY, 90])
    keys = {
        "Modality": "OT",
        "PatientName": "Test^Patient",
        "PatientID": patient_id,
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "SOPInstanceUID": sop_uid,
        "StudyDate": STUDY_DATE,
        "StudyTime": "101500",
        "BodyPartExamined": "CHEST",
        "StudyID": "1",
        "SeriesNumber": "1",
        "InstanceNumber": "1",
    }
    try:
        _run("img2dcm", "-q", "-i", "JPEG", "-sc", *[a for k, v in keys.items() for a in ("-k", f"{k}={v}")], jpg, out)
    finally:
        jpg.unlink(missing_ok=True)


def make_instance(
    src_image: Path,
    out: Path,
    kind: str,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    patient_id: str = "ANON001",
    modality: str = "DX",
    view: str | None = "PA",
    bits: int = 8,
    max_side: int = 1024,
    encoding: str = "explicit",
) -> TestInstance:
    """Write one DICOM file of the given kind (see KINDS) to ``out`` from a real image, and say what the node must do with it.

    ``modality`` DX gives Digital X-Ray For Presentation, CR gives Computed Radiography, anything else Secondary Capture.
    ``view`` applies to the kinds that do not set one themselves (pa/ap/lateral/unknown_view do); ``encoding`` (one of
    ENCODINGS) to the kinds that do not fix their own transfer syntax. UIDs left out are derived from ``out`` and ``kind``.
    """
    if kind not in EXPECT:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if bits not in (8, 16):
        raise ValueError("bits must be 8 or 16")
    out = Path(out)
    study_uid = study_uid or _uid("study", out, kind)
    series_uid = series_uid or _uid("series", out, kind)
    sop_uid = sop_instance_uid or _uid("instance", out, kind)
    if kind in _VIEW_OF_KIND:
        view = _VIEW_OF_KIND[kind]
    if kind == "16bit":
        bits = 16
    if kind in ("jpeg_baseline", "sc_colour", "hostile_size"):
        bits = 8
    if kind in ("jpeg2000", "jpegls", "jpeg_baseline", "rle", "deflated"):
        encoding = kind
    elif kind in ("multiframe", "no_pixels", "corrupt", "truncated", "hostile_size"):
        encoding = "explicit"

    gray = _gray(str(src_image), max_side)
    if kind == "sc_colour":
        _sc_colour(gray, out, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, patient_id=patient_id)
        return _instance(out, kind, "skip")

    mono1 = kind == "mono1"
    pixels = (gray.astype(np.uint32) * 4095 // 255).astype(np.uint16) if bits == 16 else gray
    maxval = 4095 if bits == 16 else 255
    if mono1:
        pixels = maxval - pixels
    if kind == "multiframe":
        pixels = np.stack([pixels, pixels[:, ::-1]])
    elif kind == "hostile_size":
        pixels = np.zeros((8, 8), np.uint8)
    sop_class = {"DX": DX_PRESENTATION, "CR": CR_IMAGE}.get(modality, SECONDARY_CAPTURE)
    ds = _dataset(
        pixels,
        sop_class=sop_class,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        patient_id=patient_id,
        modality=modality,
        view=view,
        bits=bits,
        mono1=mono1,
    )
    if kind == "no_pixels":  # an image header (Rows, Columns, Bits...) with no PixelData element
        del ds.PixelData
    elif kind == "hostile_size":  # 60000 x 60000 x 8 bit = 3.6 GB declared, 64 bytes present
        ds.Rows = ds.Columns = 60000
        ds.ImagerPixelSpacing = ["0.0072", "0.0072"]
    elif kind == "corrupt":  # a well-formed file whose PixelData holds only the first half of the rows
        half = len(ds.PixelData) // 2
        ds.PixelData = ds.PixelData[: half - half % 2]
    _encode(ds, out, encoding)
    if kind == "truncated":  # the file stops in the middle of PixelData: its element length says more than there is
        size = out.stat().st_size
        with out.open("r+b") as f:
            f.truncate(size - len(ds.PixelData) // 2)

    expect = EXPECT[kind]
    if expect == "screen" and (modality not in ("DX", "CR") or view not in ("PA", "AP")):
        expect = "skip"
    return _instance(out, kind, expect)


def _instance(path: Path, kind: str, expect: str) -> TestInstance:
    """Read the identifiers back from the file written, so a record never disagrees with what a DCMTK tool wrote."""
    ds = dcmread(path, stop_before_pixels=True, force=True)
    return TestInstance(
        path=path,
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        kind=kind,
        expect=expect,
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
    )


#: filler for make_mixed_studies once every kind is present: mostly the frontal kinds a clinic sends
_FRONTAL_WEIGHTS = {"pa": 8, "ap": 4, "mono1": 2, "16bit": 2, "jpeg_baseline": 2, "jpegls": 1, "rle": 1, "jpeg2000": 1}
_FRONTAL_WEIGHTS |= {"deflated": 1, "lateral": 2, "unknown_view": 1}


def make_mixed_studies(
    out_dir: Path, n_studies: int = 40, *, seed: int = 0, source_dir: Path = REAL_DATA, max_side: int = 1024
) -> list[TestInstance]:
    """Studies of 1-3 instances covering every kind (when they hold >= len(KINDS) instances), the same files for a seed.

    Files are ``out_dir/study_NN/I_kind.dcm``; instances of a study share StudyInstanceUID and PatientID, each has its
    own series; about one study in four is CR, the rest DX. Needs DCMTK (HAS_DCMTK).
    """
    rng = random.Random(seed)
    sizes = [rng.randint(1, 3) for _ in range(n_studies)]
    total = sum(sizes)
    kinds = list(KINDS)
    rng.shuffle(kinds)
    names, weights = zip(*_FRONTAL_WEIGHTS.items())
    kinds = (kinds + rng.choices(names, weights=weights, k=max(0, total - len(kinds))))[:total]
    rng.shuffle(kinds)
    sources = source_images(source_dir)
    out: list[TestInstance] = []
    k = 0
    for s, size in enumerate(sizes):
        study_uid = _uid("mixed", seed, "study", s)
        patient_id = f"ANON{s + 1:03d}"
        modality = "CR" if rng.random() < 0.25 else "DX"
        for i in range(size):
            kind = kinds[k]
            k += 1
            src = rng.choice(sources)
            inst = make_instance(
                src,
                Path(out_dir) / f"study_{s:02d}" / f"{i}_{kind}.dcm",
                kind,
                study_uid=study_uid,
                series_uid=_uid("mixed", seed, "series", s, i),
                sop_instance_uid=_uid("mixed", seed, "instance", s, i),
                patient_id=patient_id,
                modality=modality,
                max_side=max_side,
            )
            out.append(inst)
    return out


def make_frontal_instances(
    out_dir: Path,
    n: int,
    *,
    seed: int = 0,
    source_dir: Path = REAL_DATA,
    max_side: int = 512,
    transfer_syntax: str = "explicit",
    per_study: int = 1,
) -> list[TestInstance]:
    """``n`` screenable frontal DX instances (PA mostly, some AP), ``per_study`` to a study, for load tests.

    ``transfer_syntax`` is one of ENCODINGS ("explicit", "implicit", "jpeg_baseline", "jpegls", "rle", "jpeg2000",
    "deflated"); all but explicit, implicit and jpeg2000 need DCMTK. Files are ``out_dir/NNNN.dcm``.
    """
    if transfer_syntax not in ENCODINGS:
        raise ValueError(f"unknown transfer_syntax {transfer_syntax!r}; expected one of {ENCODINGS}")
    rng = random.Random(seed)
    sources = source_images(source_dir)
    out: list[TestInstance] = []
    for j in range(n):
        s = j // max(1, per_study)
        out.append(
            make_instance(
                rng.choice(sources),
                Path(out_dir) / f"{j:04d}.dcm",
                "ap" if rng.random() < 0.25 else "pa",
                study_uid=_uid("frontal", seed, "study", s),
                series_uid=_uid("frontal", seed, "series", s),
                sop_instance_uid=_uid("frontal", seed, "instance", j),
                patient_id=f"LOAD{s + 1:04d}",
                max_side=max_side,
                encoding=transfer_syntax,
            )
        )
    return out


#: transfer syntax UID -> short name, for test ids and reports
SYNTAX_NAMES = {
    ExplicitVRLittleEndian: "explicit",
    ImplicitVRLittleEndian: "implicit",
    JPEGBaseline8Bit: "jpeg_baseline",
    JPEGLSLossless: "jpegls",
    RLELossless: "rle",
    JPEG2000Lossless: "jpeg2000",
    DeflatedExplicitVRLittleEndian: "deflated",
}
