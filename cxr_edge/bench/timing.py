"""Timing with warm-up, a time budget, rotating inputs, and per-row peak memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.timing import measure  # noqa: F401  (bench's rows and tune time the same way)


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


def current_rss_kb() -> int | None:
    return _status_kb("VmRSS")


def peak_rss_mb() -> float | None:
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb else None
