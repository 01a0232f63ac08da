"""Timing with warm-up, a time budget and rotating inputs: shared by bench and per-machine tuning."""

from __future__ import annotations

import time

import numpy as np


def measure(fn, batches: list[np.ndarray], budget_s: float = 3.0, warmup: int = 2, min_iters: int = 5,
            max_iters: int = 10_000) -> np.ndarray:
    """Seconds per call of ``fn(batch)``, rotating through ``batches`` so caches don't flatter."""
    for i in range(warmup):
        fn(batches[i % len(batches)])
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    i = 0
    while (len(times) < min_iters or time.perf_counter() < t_end) and len(times) < max_iters:
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        fn(b)
        times.append(time.perf_counter() - t0)
        i += 1
    return np.asarray(times)
