"""Evaluate a trained Keras model on a data directory and write the report."""

from __future__ import annotations

import logging
from pathlib import Path

from ..data.labelled import load_split
from ..decision import describe_operating_point
from ..evaluation.metrics import evaluate_predictions
from ..evaluation.report import write_report
from ..manifest_schema import TrainingPhase
from .trainer import load_model_and_manifest

log = logging.getLogger(__name__)


def evaluate_model(
    model_path: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str = "auto",
    threshold: float | None = None,
    common_size: int | None = None,
    n_boot: int = 1000,
    progress: bool = True,
) -> tuple[Path, dict]:
    model, doc = load_model_and_manifest(model_path)
    classes = list(doc.classes)
    spec = doc.preprocess
    data = load_split(doc, data_dir, spec, split, common_size=common_size, progress=progress)
    probs = model.predict(data.x, batch_size=32, verbose=0)
    if threshold is None:
        threshold = doc.threshold
    result = evaluate_predictions(data.y, probs, classes, threshold, sources=data.sources,
                                  sizes=data.loaded.original_sizes, n_boot=n_boot)
    phases: tuple[TrainingPhase, ...] = doc.training.phases if doc.training is not None else ()
    ft_start = phases[0].epochs if len(phases) > 1 else None
    op = doc.operating_point
    context = {"model": str(model_path), "recipe": doc.recipe, "data": str(data_dir), "split": data.split,
               "n_images": len(data.items), "skipped": len(data.loaded.errors), "common_size": common_size,
               "operating_point_from_training": op.to_dict() if op is not None else None,
               "operating_point": describe_operating_point(op)}
    history_file = doc.training.history if doc.training is not None else None
    history = Path(model_path).with_name(history_file or "history.csv")
    report = write_report(result, out_dir, context, history, ft_start)
    return report, result
