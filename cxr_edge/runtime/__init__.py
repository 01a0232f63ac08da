"""TensorFlow-free inference runtime: backends (ONNX Runtime, TensorRT, OpenVINO, Keras reference),
batched preprocessing, screening decisions and engine-native Grad-CAM."""

from .backends.registry import backends_for, open_backend
from .result import Explanation, ScreeningResult
from .screener import Screener

__all__ = ["Screener", "ScreeningResult", "Explanation", "open_backend", "backends_for"]
