"""Confidence intervals that hold at the boundaries a screening test lives at.

A percentile bootstrap of 26/26 correct gives "100.0%-100.0%": every resample is perfect. The exact
(Clopper-Pearson) interval for a binomial proportion is about 87-100% there, which is what 26 cases can
say. Proportions (sensitivity, specificity, agreement) therefore get exact intervals from SciPy; the
ROC-AUC, which has no closed form here, gets a stratified bootstrap (positives and negatives resampled
separately, so every resample has both).
"""

from __future__ import annotations

import numpy as np

from ..extras import require


def exact_ci(k: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Clopper-Pearson interval of k successes in n trials; None when n is 0."""
    if n <= 0:
        return None
    stats = require("scipy.stats")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return [float(ci.low), float(ci.high)]


def wilson_ci(k: int, n: int, confidence: float = 0.95) -> list[float] | None:
    if n <= 0:
        return None
    stats = require("scipy.stats")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def auc_ci(is_pos, scores, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> list[float] | None:
    """Stratified bootstrap interval of the ROC-AUC; None without both classes."""
    skm = require("sklearn.metrics")
    is_pos = np.asarray(is_pos, bool)
    scores = np.asarray(scores, np.float64)
    pos, neg = np.flatnonzero(is_pos), np.flatnonzero(~is_pos)
    if len(pos) == 0 or len(neg) == 0 or n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    vals = [skm.roc_auc_score(y, np.r_[scores[rng.choice(pos, len(pos))], scores[rng.choice(neg, len(neg))]])
            for _ in range(n_boot)]
    a = (1 - confidence) / 2
    return [float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))]


def resolvable_difference(n: int, confidence: float = 0.95) -> float:
    """Smallest rate difference n cases can tell from zero: the upper exact bound for 0 events in n.

    One disagreement in 44 images (2.3%) is below what 44 images resolve (6.7%): reported as "within
    what n can resolve", not as a failure.
    """
    ci = exact_ci(0, n, confidence)
    return ci[1] if ci else 1.0
