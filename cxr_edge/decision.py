"""Turning probabilities into a screening decision at an operating threshold.

A triage box is tuned for COVID sensitivity, not for accuracy: the threshold on p(COVID) is
chosen on validation data for a target sensitivity and stored in the manifest. Below it, the
decision is the most probable of the remaining classes. NumPy only, so the runtime can use it.
"""

from __future__ import annotations

import math

import numpy as np

from .classes import COVID


def choose_threshold(is_covid: np.ndarray, p_covid: np.ndarray, target_sensitivity: float = 0.95) -> dict:
    """Highest threshold whose sensitivity on these labels is >= target, with what it achieves."""
    is_covid = np.asarray(is_covid, bool)
    p_covid = np.asarray(p_covid, np.float64)
    pos = np.sort(p_covid[is_covid])[::-1]
    if len(pos) == 0 or is_covid.all():
        return {"threshold": 0.5, "target_sensitivity": target_sensitivity, "chosen_on": "default (no positives and negatives)"}
    k = max(1, math.ceil(target_sensitivity * len(pos)))
    kth = float(pos[k - 1])
    # Midway to the next lower score rather than exactly on the k-th positive: a threshold equal to
    # a case's score would flip on the last-bit differences between Keras, ONNX Runtime and TensorRT.
    below = p_covid[p_covid < kth]
    t = float((kth + below.max()) / 2) if len(below) else kth / 2
    pred = p_covid >= t
    return {
        "threshold": t,
        "target_sensitivity": target_sensitivity,
        "sensitivity": float(pred[is_covid].mean()),
        "specificity": float((~pred[~is_covid]).mean()),
        "n_positive": int(is_covid.sum()),
        "n_negative": int((~is_covid).sum()),
    }


def decide(probs: np.ndarray, classes, threshold: float | None) -> np.ndarray:
    """Class index per row: COVID when p(COVID) >= threshold, else argmax of the other classes."""
    probs = np.asarray(probs)
    classes = list(classes)
    if threshold is None or COVID not in classes:
        return probs.argmax(axis=1)
    ci = classes.index(COVID)
    others = probs.copy()
    others[:, ci] = -np.inf
    return np.where(probs[:, ci] >= threshold, ci, others.argmax(axis=1))
