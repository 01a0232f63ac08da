"""The kit's own setup, imported by its tests. Not a conftest.py: the kit runs with ``--noconftest`` on a bare
GPU machine, and a second ``conftest.py`` would shadow tests/conftest.py (``from conftest import ...``) under
pytest's default import mode when the whole suite runs. Without a CUDA device every test skips with the reason.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "gpu" / "fixtures"


def cupy_or_skip():
    """CuPy with a working CUDA device, or skip saying why."""
    try:
        import cupy as cp
    except ImportError:
        pytest.skip("no CUDA: CuPy is not installed")
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        pytest.skip(f"no CUDA device ({type(exc).__name__}: {exc})")
    if n < 1:
        pytest.skip("no CUDA device")
    return cp


def cudart_or_skip():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        pytest.skip("cuda-bindings is not installed")
    return cudart


def resize_tolerance(shape, out, dtype_name: str) -> tuple[float, int]:
    """(largest share of pixels allowed to differ, largest step) for one resize case: 3x the worst share that
    other float32 summation orders moved on a CPU (gpu_kit/resize_tolerance.py), at least 0.1%, and one level."""
    cases = json.loads((FIXTURES / "resize_tolerance.json").read_text())["cases"]
    c = cases[f"{'x'.join(map(str, shape))}->{'x'.join(map(str, out))}:{dtype_name}"]
    return max(0.001, 3 * c["worst_moved_share"]), max(1, c["worst_step"])
