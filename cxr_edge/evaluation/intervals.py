"""Confidence intervals that hold at the boundaries a screening test lives at.

A percentile bootstrap of 26/26 correct gives "100.0%-100.0%": every resample is perfect. The exact
(Clopper-Pearson) interval for a binomial proportion is about 87-100% there, which is what 26 cases can
say. Proportions (sensitivity, specificity, agreement) therefore get exact intervals from SciPy; the
ROC-AUC, which has no closed form here, gets a stratified bootstrap (positives and negatives resampled
separately, so every resample has both).
"""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=256)  # a pure function of a few numbers, asked again for every check
def min_samples_for_width(p: float, width: float, confidence: float = 0.95, limit: int = 20_000) -> int:
    """The fewest cases from which on the exact (Clopper-Pearson) interval at the proportion ``p`` is never wider
    than ``width``: every larger set stays within it too (the width is not monotonic in n through rounding).

    At least one case on each side of the proportion is assumed (k <= n - 1), so a target near 1 is not judged by
    the narrower one-sided interval of a perfect score. ``calibrate`` refuses fewer: a threshold set on one
    positive case (n+ = 1, interval 2.5-100%) says nothing.
    """
    if not 0 < width <= 1:
        raise ValueError(f"an interval width is between 0 and 1, got {width}")
    stats = require("scipy.stats")
    a = (1 - confidence) / 2

    def wide(n: int) -> bool:
        k = min(max(round(p * n), 1), n - 1) if n > 1 else round(p * n)
        lo = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
        hi = 1.0 if k == n else float(stats.beta.ppf(1 - a, k + 1, n - k))
        return hi - lo > width

    first = next((n for n in range(1, limit + 1) if not wide(n)), limit)
    last_wide = max((n for n in range(first, min(limit, 4 * first + 50) + 1) if wide(n)), default=first - 1)
    return min(limit, max(first, last_wide + 1))
