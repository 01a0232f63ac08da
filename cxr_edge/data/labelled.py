"""Labelled images packed for a model: what evaluation (Keras or any artifact), site calibration and
bench all need, loaded one way so their numbers are comparable."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ..manifest_schema import ArtifactManifest
from ..preprocess import PreprocessSpec
from .layout import DatasetItem, scan_dataset
from .loading import LoadedImages, load_images
from .split import select_split


@dataclass
class LabelledImages:
    loaded: LoadedImages  # packed uint8 batch (x), original sizes, per-item errors
    items: list[DatasetItem]  # the items that decoded, in the order of loaded.x
    y: np.ndarray  # class index per kept item
    split: str

    @property
    def x(self) -> np.ndarray:
        return self.loaded.x

    @property
    def sources(self) -> list[str | None]:
        return [i.source for i in self.items]


def load_items(items: Sequence[DatasetItem], classes: Sequence[str], spec: PreprocessSpec, split: str = "all", *,
               common_size: int | None = None, progress: bool = False) -> LabelledImages:
    loaded = load_images([i.path for i in items], spec, common_size=common_size, progress=progress)
    kept = [items[k] for k in loaded.kept]
    return LabelledImages(loaded, kept, np.array([list(classes).index(i.label) for i in kept], dtype=np.int64), split)


def load_split(doc: ArtifactManifest, data_dir: str | Path, spec: PreprocessSpec, split: str = "auto", *,
               common_size: int | None = None, progress: bool = False) -> LabelledImages:
    """The split of ``data_dir`` a model (its manifest ``doc``) should be judged on: its own test split when
    this is its training data, else every image (see :func:`.split.select_split`)."""
    classes = list(doc.classes)
    ds = scan_dataset(data_dir, classes=classes)
    if tuple(ds.classes) != tuple(classes):
        raise DatasetError(f"The model predicts {classes} but the data has {list(ds.classes)}.")
    items, used = select_split(doc, ds, split)
    if not items:
        raise DatasetError(f"The {used} split of {data_dir} is empty.")
    return load_items(items, classes, spec, used, common_size=common_size, progress=progress)
