"""Metrics over predicted probabilities; independent of the engine that produced them.

Beyond the published classification report this adds what a screening deployment needs: COVID
sensitivity/specificity at the operating threshold with exact (Clopper-Pearson) intervals, ROC-AUC with
stratified-bootstrap intervals (:mod:`.intervals`), a per-source
breakdown, and a size-only probe that measures how much the label leaks through image size.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from ..classes import COVID
from ..decision import decide
from ..extras import require
from .intervals import auc_ci, exact_ci


def _sens_spec(is_pos: np.ndarray, pred_pos: np.ndarray) -> tuple[float | None, float | None]:
    sens = float(pred_pos[is_pos].mean()) if is_pos.any() else None
    spec = float((~pred_pos[~is_pos]).mean()) if (~is_pos).any() else None
    return sens, spec


def covid_operating_metrics(y_true, probs, classes, threshold, n_boot=1000, seed=0) -> dict | None:
    """COVID sensitivity/specificity at ``threshold`` with exact 95% intervals, and the AUC with a
    stratified-bootstrap interval."""
    classes = list(classes)
    if COVID not in classes:
        return None
    ci = classes.index(COVID)
    is_pos = np.asarray(y_true) == ci
    pred_pos = probs[:, ci] >= threshold
    sens, spec = _sens_spec(is_pos, pred_pos)
    tp, tn = int((pred_pos & is_pos).sum()), int((~pred_pos & ~is_pos).sum())
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    return {
        "threshold": float(threshold),
        "sensitivity": sens,
        "sensitivity_ci95": exact_ci(tp, n_pos),
        "true_positives": tp,
        "specificity": spec,
        "specificity_ci95": exact_ci(tn, n_neg),
        "true_negatives": tn,
        "n_positive": n_pos,
        "n_negative": n_neg,
        "interval_method": "Clopper-Pearson exact (proportions), stratified bootstrap (AUC)",
        "auc_ci95": auc_ci(is_pos, probs[:, ci], n_boot, seed),
    }


def roc_per_class(y_true, probs, classes) -> dict:
    """One-vs-rest ROC curve and AUC per class (None where a class has no positives or negatives)."""
    skm = require("sklearn.metrics")
    out: dict[str, dict[str, Any] | None] = {}
    for k, c in enumerate(classes):
        pos = np.asarray(y_true) == k
        if pos.all() or not pos.any():
            out[c] = None
            continue
        fpr, tpr, _ = skm.roc_curve(pos, probs[:, k])
        out[c] = {"auc": float(skm.roc_auc_score(pos, probs[:, k])), "fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


def size_confounder_probe(sizes, y_true, seed: int = 0) -> dict | None:
    """Cross-validated accuracy of a classifier that sees only (height, width): the size leak.

    A shallow decision tree rather than a linear model, because the leak is categorical: in the
    public data Normal images are exactly 224 or 256 px while COVID images come in every size.
    """
    sk_tree = require("sklearn.tree")
    sk_ms = require("sklearn.model_selection")
    y = np.asarray(y_true)
    counts = np.bincount(y)
    folds = int(min(5, counts[counts > 0].min())) if len(counts[counts > 0]) > 1 else 0
    if folds < 2:
        return None
    hw = np.asarray(sizes, dtype=np.float64)
    feats = np.column_stack([np.log(hw[:, 0]), np.log(hw[:, 1]), np.log(hw[:, 0] / hw[:, 1])])
    cv = sk_ms.StratifiedKFold(folds, shuffle=True, random_state=seed)
    clf = sk_tree.DecisionTreeClassifier(max_depth=4, random_state=seed)
    scores = sk_ms.cross_val_score(clf, feats, y, cv=cv)
    return {
        "accuracy_from_size_only": float(scores.mean()),
        "majority_class_rate": float(counts.max() / counts.sum()),
        "folds": folds,
        "explanation": "A depth-4 decision tree on the stored height, width and aspect ratio alone. "
        "Far above the majority rate means image size leaks the label in this data.",
    }


def evaluate_predictions(
    y_true,
    probs,
    classes,
    threshold: float | None = None,
    sources=None,
    sizes=None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Everything the report shows, as plain JSON-able data."""
    skm = require("sklearn.metrics")
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    classes = list(classes)
    labels = list(range(len(classes)))
    y_pred = decide(probs, classes, threshold)
    report = skm.classification_report(y_true, y_pred, labels=labels, target_names=classes,
                                       output_dict=True, zero_division=0)
    roc = roc_per_class(y_true, probs, classes)
    aucs = [r["auc"] for r in roc.values() if r]
    out = {
        "n": int(len(y_true)),
        "classes": classes,
        "decision_rule": (f"COVID if p(COVID) >= {threshold:.2f}, else argmax of the other classes"
                          if threshold is not None and COVID in classes else "argmax"),
        "accuracy": float((y_pred == y_true).mean()),
        "accuracy_argmax": float((probs.argmax(1) == y_true).mean()),
        "per_class": {c: {k: float(report[c][k]) for k in ("precision", "recall", "f1-score", "support")} for c in classes},
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "roc_auc": {c: (r["auc"] if r else None) for c, r in roc.items()},
        "roc_auc_macro": float(np.mean(aucs)) if aucs else None,
        "roc_curves": {c: ({"fpr": r["fpr"], "tpr": r["tpr"]} if r else None) for c, r in roc.items()},
        "covid": covid_operating_metrics(y_true, probs, classes, 0.5 if threshold is None else threshold, n_boot, seed),
    }
    if sources is not None:
        by_source = defaultdict(list)
        for i, s in enumerate(sources):
            by_source[s or "unknown"].append(i)
        out["per_source"] = {}
        for s, members in sorted(by_source.items()):
            idx = np.asarray(members)
            yt, yp = y_true[idx], y_pred[idx]
            entry = {"n": int(len(idx)), "counts": {c: int((yt == k).sum()) for k, c in enumerate(classes)},
                     "accuracy": float((yt == yp).mean())}
            if COVID in classes:
                ci = classes.index(COVID)
                entry["covid_sensitivity"], entry["covid_specificity"] = _sens_spec(yt == ci, yp == ci)
                r = roc_per_class(yt, probs[idx], classes).get(COVID)
                entry["covid_auc"] = r["auc"] if r else None
            out["per_source"][s] = entry
    if sizes is not None:
        out["size_probe"] = size_confounder_probe(sizes, y_true, seed)
    return out
