"""Timing with warm-up, a time budget, rotating inputs, and per-row peak memory."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def measure(fn, batches: list[np.ndarray], budget_s: float = 3.0, warmup: int = 2, min_iters: int = 5,
            max_iters: int = 10_000) -> np.ndarray:
    """Seconds per call of ``fn(batch)``, rotating through ``batches`` so caches don't flatter."""
    for i in range(warmup):
        fn(batches[i % len(batches)])
    times = []
    t_end = time.perf_counter() + budget_s
    i = 0
    while (len(times) < min_iters or time.perf_counter() < t_end) and len(times) < max_iters:
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        fn(b)
        times.append(time.perf_counter() - t0)
        i += 1
    return np.asarray(times)


def summarise(times: np.ndarray, batch: int) -> dict:
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return {"iterations": int(len(times)), "p50_ms": 1e3 * p50, "p90_ms": 1e3 * p90, "p99_ms": 1e3 * p99,
            "mean_ms": 1e3 * float(times.mean()), "throughput_ips": batch / float(np.median(times))}


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> int | None:
    """Reset the kernel's high-water mark (Linux: write 5 to clear_refs); returns current RSS in kB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kb("VmRSS")


def peak_rss_mb() -> float | None:
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb else None
