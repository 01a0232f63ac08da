"""Evaluate any deployable artifact (ONNX, TensorRT engine, Triton model) on a labelled folder, without
TensorFlow: the engine that screens patients is the one measured, with the same report as a ``.keras``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..data import scan_dataset
from ..data.loading import load_images
from ..data.split import select_split
from ..decision import describe_operating_point
from ..errors import DatasetError
from ..evaluation.metrics import evaluate_predictions
from ..evaluation.report import write_report
from .screener import Screener

log = logging.getLogger(__name__)


def evaluate_artifact(artifact: str | Path, data_dir: str | Path, out_dir: str | Path, *, split: str = "auto",
                      threshold: float | None = None, common_size: int | None = None, n_boot: int = 1000,
                      progress: bool = True, backend: str | None = None, device: str = "auto",
                      batch_size: int = 32) -> tuple[Path, dict]:
    """Screen the chosen split with ``artifact`` and write report.md/json and plots (see evaluate_model)."""
    # a failed-gate artifact may be evaluated: that is how one finds out how it fails
    with Screener(artifact, backend=backend, device=device, batch_size=batch_size, isolation=None,
                  allow_failed_gate=True) as s:
        doc, classes = s.manifest, s.classes
        ds = scan_dataset(data_dir, classes=classes)
        if tuple(ds.classes) != tuple(classes):
            raise DatasetError(f"The artifact predicts {classes} but the data has {list(ds.classes)}.")
        items, used_split = select_split(doc, ds, split)
        if not items:
            raise DatasetError(f"The {used_split} split of {data_dir} is empty.")
        loaded = load_images([i.path for i in items], s.engine.spec, common_size=common_size, progress=progress)
        kept = [items[k] for k in loaded.kept]
        y = np.array([classes.index(i.label) for i in kept])
        probs = np.concatenate([s.engine.infer(loaded.x[i : i + batch_size], ["probs"])["probs"]
                                for i in range(0, len(loaded.x), batch_size)]) if len(kept) else np.zeros((0, len(classes)))
        info = s.engine.info
    t = threshold if threshold is not None else doc.threshold
    result = evaluate_predictions(y, probs, classes, t, sources=[i.source for i in kept], sizes=loaded.original_sizes,
                                  n_boot=n_boot)
    context = {"model": str(artifact), "engine": f"{info.backend} / {info.provider} / {info.precision}",
               "recipe": doc.recipe, "data": str(data_dir), "split": used_split, "n_images": len(kept),
               "skipped": len(loaded.errors), "common_size": common_size,
               "operating_point": "threshold given on the command line" if threshold is not None
               else describe_operating_point(doc.operating_point),
               "operating_point_from_training": doc.operating_point or None}
    return write_report(result, out_dir, context), result
