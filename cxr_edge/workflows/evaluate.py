"""Evaluate any deployable artifact (ONNX, TensorRT engine, Triton model) on a labelled folder, without
TensorFlow: the engine that screens patients is the one measured, with the same report as a ``.keras``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..data.labelled import load_split
from ..decision import describe_operating_point
from ..evaluation.metrics import evaluate_predictions
from ..evaluation.report import write_report
from ..runtime.screener import Screener

log = logging.getLogger(__name__)


def evaluate_artifact(artifact: str | Path, data_dir: str | Path, out_dir: str | Path, *, split: str = "auto",
                      threshold: float | None = None, common_size: int | None = None, n_boot: int = 1000,
                      progress: bool = True, backend: str | None = None, device: str = "auto",
                      batch_size: int = 32, self_check: str = "refuse") -> tuple[Path, dict]:
    """Screen the chosen split with ``artifact`` and write report.md/json and plots (see evaluate_model)."""
    # a failed-gate artifact may be evaluated: that is how one finds out how it fails
    with Screener(artifact, backend=backend, device=device, batch_size=batch_size, isolation=None,
                  allow_failed_gate=True, self_check=self_check) as s:
        doc, classes = s.manifest, s.classes
        data = load_split(doc, data_dir, s.engine.spec, split, common_size=common_size, progress=progress)
        probs = s.engine.infer_all(data.x, batch_size)
        info = s.engine.info
    t = threshold if threshold is not None else doc.threshold
    result = evaluate_predictions(data.y, probs, classes, t, sources=data.sources, sizes=data.loaded.original_sizes,
                                  n_boot=n_boot)
    context = {"model": str(artifact), "engine": f"{info.backend} / {info.provider} / {info.precision}",
               "self_check": info.self_check.text() if info.self_check else None,
               "recipe": doc.recipe, "data": str(data_dir), "split": data.split, "n_images": len(data.items),
               "skipped": len(data.loaded.errors), "common_size": common_size,
               "operating_point": "threshold given on the command line" if threshold is not None
               else describe_operating_point(doc.operating_point),
               "operating_point_from_training": (doc.operating_point.to_dict() or None) if doc.operating_point else None}
    return write_report(result, out_dir, context), result
