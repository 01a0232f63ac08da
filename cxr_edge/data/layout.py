"""Discover a dataset from a directory tree, the way public CXR collections are laid out.

Accepted layouts (folder names matched through the class aliases in :mod:`cxr_edge.classes`):

* ``ROOT/<class>/*.png`` (COVID-19 Radiography Database style; ``<class>/images/`` is used and
  ``<class>/masks/`` ignored when present);
* ``ROOT/{train,test[,val]}/<class>/...`` (pre-split, as in the published ResNet50 recipe).

Folders of classes the recipe does not use, and folders that are no class at all, are reported in
``Dataset.ignored`` and never merged into another class.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..classes import CANONICAL_CLASSES, canonical_class, ordered
from ..errors import DatasetError
from .provenance import Provenance, lookup, read_provenance

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
_SPLIT_ALIASES = {"train": "train", "training": "train", "test": "test", "testing": "test",
                  "val": "val", "valid": "val", "validation": "val"}
_MASK_DIRS = {"masks", "mask", "lung masks", "lung_masks"}


@dataclass(frozen=True)
class DatasetItem:
    path: Path
    relpath: str  # relative to the dataset root, '/'-separated: the stable identity of the item
    label: str  # canonical class name
    source: str | None = None
    patient: str | None = None
    presplit: str | None = None  # 'train' / 'val' / 'test' when the folders said so

    @property
    def group(self) -> str:
        """What must not be split apart: the patient when known, else the image itself."""
        return self.patient or self.relpath


@dataclass
class Dataset:
    root: Path
    classes: tuple[str, ...]
    items: list[DatasetItem]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (relpath, why)
    notes: list[str] = field(default_factory=list)
    provenance_file: str | None = None

    @property
    def presplit(self) -> bool:
        return any(i.presplit for i in self.items)

    def class_counts(self) -> dict[str, int]:
        c = Counter(i.label for i in self.items)
        return {k: c.get(k, 0) for k in self.classes}

    def fingerprint(self) -> str:
        """sha256 over (relpath, label, byte size) of every item: identifies the data a model saw."""
        h = hashlib.sha256()
        for it in sorted(self.items, key=lambda i: i.relpath):
            try:
                size = it.path.stat().st_size
            except OSError:
                size = -1
            h.update(f"{it.relpath}\t{it.label}\t{size}\n".encode())
        return h.hexdigest()

    def summary(self) -> str:
        lines = [f"Dataset {self.root}: {len(self.items)} images, classes {self.class_counts()}"]
        if self.provenance_file:
            lines.append(f"  provenance from {self.provenance_file}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  ignored {p}: {why}" for p, why in self.ignored]
        return "\n".join(lines)


def _image_files(folder: Path, ignored: list, root: Path):
    images = folder / "images"
    base = images if images.is_dir() else folder
    for child in sorted(folder.iterdir()) if base is images else []:
        if child != images:
            ignored.append((child.relative_to(root).as_posix(), "not the images/ folder of a class"))
    for p in sorted(base.rglob("*")):
        if any(part.lower() in _MASK_DIRS for part in p.relative_to(base).parts[:-1]):
            continue
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            yield p
        elif p.is_file() and not p.name.startswith("."):
            ignored.append((p.relative_to(root).as_posix(), "not an image file by extension"))


def _class_folders(folder: Path, root: Path, wanted: tuple[str, ...], ignored: list):
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        rel = child.relative_to(root).as_posix()
        canon = canonical_class(child.name)
        if canon is None:
            ignored.append((rel, "folder is not a known class (see cxr_edge.classes for aliases)"))
        elif canon not in wanted:
            ignored.append((rel, f"class {canon!r} is not used by this recipe"))
        else:
            yield child, canon


def scan_dataset(
    root: str | Path,
    classes=None,
    metadata_csv: str | Path | None = None,
) -> Dataset:
    """Find every image of the wanted classes under ``root``; report, never merge, the rest."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Data directory {root} does not exist or is not a directory.")
    wanted = ordered(classes) if classes else CANONICAL_CLASSES
    ignored: list[tuple[str, str]] = []
    notes: list[str] = []
    subdirs = [p for p in sorted(root.iterdir()) if p.is_dir()]
    splits = {_SPLIT_ALIASES[p.name.lower()]: p for p in subdirs if p.name.lower() in _SPLIT_ALIASES}
    if "train" in splits and len(splits) >= 2:
        tops: list[tuple[Path, str | None]] = [(d, name) for name, d in splits.items()]
        for p in subdirs:
            if p.name.lower() not in _SPLIT_ALIASES:
                ignored.append((p.name, "not a split folder in a train/test layout"))
    else:
        tops = [(root, None)]

    prov_path = Path(metadata_csv) if metadata_csv else root / "SOURCES.csv"
    table = read_provenance(prov_path) if prov_path.is_file() else {}
    if metadata_csv and not prov_path.is_file():
        raise DatasetError(f"Metadata CSV {prov_path} does not exist.")

    items: list[DatasetItem] = []
    seen_folders: dict[tuple[str | None, str], list[str]] = {}
    for top, split in tops:
        for folder, label in _class_folders(top, root, wanted, ignored):
            seen_folders.setdefault((split, label), []).append(folder.name)
            for f in _image_files(folder, ignored, root):
                rel = f.relative_to(root).as_posix()
                prov = lookup(table, rel) if table else Provenance()
                items.append(DatasetItem(f, rel, label, prov.source, prov.patient, split))
    for (_split, label), names in seen_folders.items():
        if len(names) > 1:
            notes.append(f"folders {names} are all aliases of {label!r} and were combined")
    if not items:
        own = canonical_class(root.name)
        if own is not None:  # the user pointed at one class folder rather than the data root
            raise DatasetError(
                f"{root} is itself a class folder ({own}); pass its parent, which holds one folder per class: "
                f"{root.parent}")
        raise DatasetError(
            f"No images of classes {list(wanted)} under {root}. Expected ROOT/<class>/ or "
            f"ROOT/train/<class>/ folders; found {[p.name for p in subdirs] or 'no folders'}."
        )
    found = tuple(c for c in wanted if any(i.label == c for i in items))
    missing = [c for c in wanted if c not in found]
    if classes and missing:
        raise DatasetError(f"No images for class(es) {missing} under {root}; the recipe needs {list(wanted)}.")
    if table:
        unmatched = sum(1 for i in items if i.source is None)
        if unmatched:
            notes.append(f"{unmatched} images have no row in {prov_path.name}")
    return Dataset(root, found, items, ignored, notes, str(prov_path) if table else None)
