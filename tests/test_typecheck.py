"""The TensorRT/CUDA modules type-check against tensorrt-stubs (the 10.13 API), where no TensorRT can run.

With the stubs installed, ``import tensorrt as trt`` inside the build and backend code is typed, so a
misspelt method, a wrong argument type or an unchecked Optional fails here. TensorRT 11's removals are
checked by test_tensorrt_api.py against the real 11.4 bindings.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["cxr_edge/runtime/backends/tensorrt_api.py", "cxr_edge/runtime/backends/tensorrt.py",
           "cxr_edge/export/tensorrt_build.py", "cxr_edge/doctor.py"]


def _missing() -> str | None:
    if shutil.which("mypy") is None and importlib.util.find_spec("mypy") is None:
        return "mypy is not installed (dev extra)"
    try:
        importlib.metadata.version("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        return "tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs==10.13.0.35.1"
    return None


def test_tensorrt_code_typechecks_against_the_stubs():
    why = _missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the type check: {why}")
        pytest.skip(why)
    res = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent",
                          "--no-error-summary", *MODULES], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
