"""LoadGen's query sample library: the samples a run draws from, loaded and unloaded when LoadGen says.

One sample is what the system under test receives: the packed tensor (an engine timed directly), the image file's
bytes as a client uploads them (the HTTP service: decode included), or a DX DICOM instance (the DICOM node). Labels
come from the class folders, so an accuracy run is scored without decoding anything twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import DatasetItem, scan_dataset
from ..data.labelled import load_items
from ..data.split import select_split
from ..errors import ConfigError, DatasetError
from ..manifest import Manifest
from ..preprocess import PreprocessSpec, pack_image, pack_source

log = logging.getLogger(__name__)

#: what a sample is, per system under test
KINDS = ("tensor", "encoded", "dicom")
#: memory the loaded samples may take at most (also at most a quarter of what is available)
MAX_LOADED_BYTES = 2 << 30
#: DICOM instances are written at most this long a side (the sources run to 4000 px), and at least the node's
#: 128 px floor (its rules skip smaller images), so every instance sent is one the node screens
DICOM_MAX_SIDE, DICOM_MIN_SIDE = 1024, 128
#: Digital X-Ray Image Storage - For Presentation
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
#: synthetic radiographs when no data is given: how many, and how large the encoded ones are
SYNTHETIC_COUNT, SYNTHETIC_SIDE = 32, 256


@dataclass
class SampleSource:
    """Where the samples come from: image files with their labels, or synthetic radiographs (unlabelled)."""

    classes: list[str]
    spec: PreprocessSpec
    items: list[DatasetItem] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    synthetic_count: int = 0  # synthetic radiographs instead of items, made when first loaded
    info: dict[str, Any] = field(default_factory=dict)
    _made: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.items) or self.synthetic_count

    def synthetic(self, i: int) -> np.ndarray:
        """Synthetic radiograph ``i`` (uint8 grey), the same for every run."""
        if i not in self._made:
            from ..synthetic import SYNTHETIC_CLASSES, synth_cxr

            img = synth_cxr(SYNTHETIC_CLASSES[i % 3], SYNTHETIC_SIDE, np.random.default_rng(i))
            self._made[i] = (img * 255).astype(np.uint8)
        return self._made[i]

    @property
    def paths(self) -> list[Path]:
        return [i.path for i in self.items]

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


def sample_source(doc: Manifest, data: str | Path | None, limit: int | None = None) -> SampleSource:
    """The model's test split of ``data`` when it is the data the model trained on (else every image), or synthetic
    radiographs when no data is given; at most ``limit`` samples."""
    classes, spec = list(doc.classes), doc.preprocess
    if data is None:
        n = limit or SYNTHETIC_COUNT
        return SampleSource(classes, spec, synthetic_count=n, labels=np.full(n, -1),
                            info={"data": "synthetic (unlabelled)", "split": None, "n": n})
    ds = scan_dataset(data, classes=classes)
    items, split = select_split(doc, ds, "auto")
    items = items[:limit] if limit else items
    if not items:
        raise DatasetError(f"No images of the classes {classes} in the {split} split of {data}: point --data at a "
                           "folder with one sub-folder per class.")
    labels = np.array([classes.index(i.label) for i in items], np.int64)
    return SampleSource(classes, spec, items=list(items), labels=labels,
                        info={"data": str(data), "split": split, "n": len(items)})


def performance_count(source: SampleSource, kind: str) -> int:
    """How many samples LoadGen may hold loaded at once: all of them when they fit in the memory budget."""
    per = sample_bytes(source, kind)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = MAX_LOADED_BYTES * 4
    budget = min(MAX_LOADED_BYTES, avail // 4)
    return max(1, min(len(source), budget // max(1, per)))


def sample_bytes(source: SampleSource, kind: str) -> int:
    """Memory one loaded sample takes, about."""
    if kind == "tensor":
        return int(np.prod(source.spec.input_shape))
    if kind == "dicom":
        return DICOM_MAX_SIDE * DICOM_MAX_SIDE
    if source.items:
        sizes = [i.path.stat().st_size for i in source.items[:: max(1, len(source.items) // 16)]]
        return int(max(sizes))
    return SYNTHETIC_SIDE * SYNTHETIC_SIDE


class SampleLibrary:
    """The loaded samples of one kind, by QSL index; ``load``/``unload`` are LoadGen's callbacks."""

    def __init__(self, source: SampleSource, kind: str):
        if kind not in KINDS:
            raise ConfigError(f"Unknown sample kind {kind!r}; expected one of {', '.join(KINDS)}.")
        self.source, self.kind = source, kind
        self.loaded: dict[int, Any] = {}

    def load(self, indices: Sequence[int]) -> None:
        """Decode (tensors, DICOM) or read (encoded files) the samples LoadGen is about to issue."""
        wanted = [i for i in indices if i not in self.loaded]
        if self.kind == "tensor":
            self.loaded.update(zip(wanted, self._tensors(wanted)))
        else:
            make = self._encoded if self.kind == "encoded" else self._dicom
            self.loaded.update((i, make(i)) for i in wanted)

    def unload(self, indices: Sequence[int]) -> None:
        for i in indices:
            self.loaded.pop(i, None)

    def tensors(self, indices: Sequence[int]) -> np.ndarray:
        """The packed batch of loaded tensor samples, in order."""
        return np.stack([self.loaded[i] for i in indices])

    def reference_tensors(self, indices: Sequence[int]) -> np.ndarray:
        """The packed tensors of exactly what was sent (a DICOM instance's pixels are the image made grey and fitted
        to the node's sizes), for the FP32 reference answers."""
        if self.kind != "dicom":
            return np.stack(self._tensors(list(indices)))
        return np.stack([pack_source(dicom_bytes(dx_instance(*self._dicom(i))), self.source.spec)[0] for i in indices])

    def _tensors(self, indices: list[int]) -> list[np.ndarray]:
        s = self.source
        if not s.items:
            return [pack_image(s.synthetic(i), s.spec) for i in indices]
        got = load_items([s.items[i] for i in indices], s.classes, s.spec)
        if len(got.items) != len(indices):
            bad = sorted({str(s.items[i].path) for i in indices} - {str(it.path) for it in got.items})
            raise DatasetError(f"{len(bad)} image(s) could not be decoded, e.g. {bad[0]}: remove them from the data "
                               "folder (cxr-edge scan lists them) and run again.")
        return list(got.x)

    def _encoded(self, i: int) -> tuple[bytes, str, str]:
        """(file bytes, content type, file name), as a kiosk uploads the image."""
        s = self.source
        if s.items:
            p = s.items[i].path
            kind = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(p.suffix.lower(),
                                                                                         "application/octet-stream")
            return p.read_bytes(), kind, p.name
        import cv2

        ok, buf = cv2.imencode(".png", s.synthetic(i))
        if not ok:
            raise ConfigError("OpenCV could not encode a synthetic image as PNG; check the opencv installation.")
        return buf.tobytes(), "image/png", f"synthetic-{i}.png"

    def _dicom(self, i: int) -> tuple[np.ndarray, str]:
        """(grey uint8 pixels, patient id): the instance is built per send, each with its own UIDs."""
        s = self.source
        if s.items:
            import cv2

            gray = cv2.imread(str(s.items[i].path), cv2.IMREAD_GRAYSCALE)
            if gray is None:
                raise DatasetError(f"Cannot read {s.items[i].path} as an image: remove it from the data folder.")
        else:
            gray = s.synthetic(i)
        return _fit(gray), f"LOADGEN{i:05d}"


def _fit(gray: np.ndarray) -> np.ndarray:
    """Longest side at most DICOM_MAX_SIDE (area), shortest at least DICOM_MIN_SIDE (linear)."""
    import cv2

    h, w = gray.shape[:2]
    scale = min(1.0, DICOM_MAX_SIDE / max(h, w))
    scale = max(scale, DICOM_MIN_SIDE / min(h, w))
    if scale == 1.0:
        return np.ascontiguousarray(gray)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def dx_instance(pixels: np.ndarray, patient_id: str):
    """A frontal (PA) chest DX instance, For Presentation, 8-bit MONOCHROME2, explicit VR little endian, with fresh
    study/series/instance UIDs: what the node's default rules screen."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(DX_PRESENTATION)
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = UID(DX_PRESENTATION)
    uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = time.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time.strftime("%H%M%S")
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PatientName, ds.PatientID = "LoadGen^Sample", patient_id
    ds.AccessionNumber = ds.ReferringPhysicianName = ds.PatientBirthDate = ds.PatientSex = ""
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    data = pixels.tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    return ds


def dicom_bytes(ds) -> bytes:
    """The instance as a DICOM file (preamble, meta header), the bytes a receiver decodes."""
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
