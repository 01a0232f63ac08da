"""The GPU verification kit's tests (see gpu_kit/README.md).

They run on a bare GPU machine (PyTorch, CuPy, NumPy, OpenCV, onnxruntime CPU; no TensorFlow, no TensorRT)
with ``pytest --noconftest tests/gpu``, so nothing here may rely on tests/conftest.py; this file is the
kit's own and is loaded when the suite runs normally. Without a CUDA device every test skips with the reason.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
