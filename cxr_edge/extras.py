"""Lazy imports of optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

#: import name -> (pip extra, what it is used for)
_EXTRAS: dict[str, tuple[str, str]] = {
    "tensorflow": ("train", "training and Keras models"),
    "keras": ("train", "training and Keras models"),
    "tf2onnx": ("train", "exporting Keras models to ONNX"),
    "sklearn": ("bench", "evaluation metrics (also in the train extra)"),
    "matplotlib": ("bench", "evaluation and benchmark plots (also in the train extra)"),
    "sympy": ("export", "INT8 quantisation of ONNX models (also in the train extra)"),
    "pydicom": ("dicom", "reading DICOM files"),
    "simplejpeg": (None, "strict JPEG decoding"),
    "tifffile": (None, "reading TIFF headers"),
    "pebble": (None, "isolated decoding in worker processes"),
    "onnxruntime": ("cpu", "running ONNX artifacts (on a GPU server: the gpu-cu12 or gpu-cu13 extra instead)"),
    "onnx": (None, "inspecting ONNX graphs"),
    "cryptography": ("sign", "signed artifacts (keygen, sign, --trusted-key)"),
    "openvino": ("openvino", "the OpenVINO backend"),
    "fastapi": ("serve", "the screening service"),
    "uvicorn": ("serve", "the screening service"),
    "prometheus_client": ("serve", "service metrics"),
    "python_multipart": ("serve", "multipart uploads to the screening service"),
    "tritonclient": ("triton", "Triton model repositories and the triton:// backend"),
    "tensorrt": ("gpu-cu12", "TensorRT engines (gpu-cu13 for CUDA 13; on Jetson, TensorRT comes with JetPack)"),
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` telling the user which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra, purpose = _EXTRAS.get(top, (None, "this feature"))
        hint = f"pip install 'cxr-edge[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtraError(
            f"{purpose} needs the '{top}' package, which is not installed ({exc}). "
            f"Install it with: {hint}"
        ) from exc
