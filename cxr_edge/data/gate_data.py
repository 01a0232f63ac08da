"""Images for calibration and gates: calibration from the training split only, gates on validation.

When the data is the model's own training data (same fingerprint), the model's recorded split is
reproduced exactly, so calibration can never see a validation or test image. With no real data at
all, synthetic images stand in and the manifest says so.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..manifest_schema import ArtifactManifest
from ..preprocess import PreprocessSpec
from ..synthetic import SYNTHETIC_CLASSES, synthetic_parity_images, write_synthetic_dataset
from . import scan_dataset, split_dataset
from .loading import load_images
from .split import is_training_data, training_split

log = logging.getLogger(__name__)


@dataclass
class GateData:
    calib_x: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    synth_x: np.ndarray  # extra synthetic images for the FP32/FP16 parity checks
    info: dict
    val_paths: tuple[Path, ...] = ()  # the validation images' files (real data only): the decode gate re-reads them

    @property
    def parity_x(self) -> np.ndarray:
        return np.concatenate([self.val_x, self.synth_x])


def _sample(items, n, seed):
    if len(items) <= n:
        return list(items)
    idx = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in idx]


def load_gate_data(doc: ArtifactManifest, spec: PreprocessSpec, data_dir: str | Path | None, calib_size: int = 200,
                   max_val: int = 500, seed: int = 0) -> GateData:
    classes = doc.classes
    root = Path(data_dir) if data_dir else None
    trained_on = doc.data
    if root is None and trained_on.root and Path(trained_on.root).is_dir():
        root = Path(trained_on.root)
    tmp = None
    synthetic = root is None
    if root is None:
        log.warning("no calibration data given and the training data is not here: using synthetic images "
                    "(pass --calib DATA with real radiographs for a meaningful INT8 calibration)")
        tmp = tempfile.TemporaryDirectory()
        root = write_synthetic_dataset(tmp.name, per_class=max(40, calib_size // len(classes)),
                                       classes=tuple(c for c in classes if c in SYNTHETIC_CLASSES), seed=seed)
    try:
        ds = scan_dataset(root, classes=classes)
        same = is_training_data(ds, trained_on)
        splits = training_split(ds, trained_on) if same else split_dataset(ds, seed=seed)
        calib_items = _sample(splits["train"], calib_size, seed)
        val_items = _sample(splits["val"], max_val, seed)
        calib = load_images([i.path for i in calib_items], spec)
        val = load_images([i.path for i in val_items], spec)
        val_y = np.array([classes.index(val_items[k].label) for k in val.kept])
        info = {
            "data": str(root) if not synthetic else "synthetic (generated)",
            "synthetic": synthetic,
            "fingerprint": ds.fingerprint(),
            "same_as_training_data": same,
            "calibration_split": "train",
            "n_calibration": len(calib.kept),
            "gate_split": "val",
            "n_gate": len(val.kept),
            "skipped": [str(e) for e in calib.errors + val.errors],
        }
        if len(calib.kept) < 200 and not synthetic:
            log.warning("only %d calibration images (200+ recommended)", len(calib.kept))
        paths = () if synthetic else tuple(val_items[k].path for k in val.kept)
        return GateData(calib.x, val.x, val_y, synthetic_parity_images(spec), info, paths)
    finally:
        if tmp is not None:
            tmp.cleanup()
