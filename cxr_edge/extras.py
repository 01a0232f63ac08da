"""Lazy imports of optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

#: import name -> (pip extra, what it is used for)
_EXTRAS: dict[str, tuple[str | None, str]] = {
    "tensorflow": ("train", "training and Keras models"),
    "keras": ("train", "training and Keras models"),
    "tf2onnx": ("train", "exporting Keras models to ONNX"),
    "sklearn": ("bench", "evaluation metrics (also in the train extra)"),
    "mlperf_loadgen": ("loadgen", "MLPerf LoadGen runs (cxr-edge loadgen)"),
    "glymur": ("dicom", "JPEG 2000 decoding at a reduced resolution level (needs the system libopenjp2)"),
    "scipy": ("bench", "exact confidence intervals and calibration (scikit-learn brings it)"),
    "matplotlib": ("bench", "evaluation and benchmark plots (also in the train extra)"),
    "sympy": ("export", "INT8 quantisation of ONNX models (also in the train extra)"),
    "pydicom": ("dicom", "reading DICOM files"),
    "pynetdicom": ("node", "the DICOM node (Storage SCP and C-STORE delivery)"),
    "highdicom": ("node", "DICOM result objects (TID 1500 report, heatmap Secondary Capture and Segmentation)"),
    "dicomweb_client": ("node", "delivering results by STOW-RS"),
    "tenacity": ("node", "delivery retries with backoff"),
    "hl7": ("node", "HL7 v2 results to a RIS or EHR over MLLP"),
    "psycopg": ("postgres", "a PostgreSQL job store shared by several nodes"),
    "simplejpeg": (None, "strict JPEG decoding"),
    "tifffile": (None, "reading TIFF headers"),
    "pebble": (None, "isolated decoding in worker processes"),
    "onnxruntime": ("cpu", "running ONNX artifacts (on a GPU server: the gpu-cu12 or gpu-cu13 extra instead)"),
    "onnx": (None, "inspecting ONNX graphs"),
    "cryptography": ("sign", "signed artifacts (keygen, sign, --trusted-key)"),
    "openvino": ("openvino", "the OpenVINO backend"),
    "nncf": ("export", "NNCF quantisation for the CPU target (also in the train and peers extras)"),
    "fastapi": ("serve", "the screening service"),
    "uvicorn": ("serve", "the screening service"),
    "prometheus_client": ("serve", "service metrics"),
    "python_multipart": ("serve", "multipart uploads to the screening service"),
    "tritonclient": ("triton", "Triton model repositories and the triton:// backend"),
    "tensorrt": ("gpu-cu12", "TensorRT engines (gpu-cu13 for CUDA 13; on Jetson, TensorRT comes with JetPack)"),
}


#: imports whose native start-up chatter (absl "before InitializeLog", oneDNN notices, "could not find cuda
#: drivers") goes to file descriptor 2 before TF_CPP_MIN_LOG_LEVEL is read: silenced unless CXR_EDGE_VERBOSE_TF=1
_NOISY_NATIVE_IMPORTS = ("tensorflow", "keras", "tf2onnx")


def _quiet_native_import(module: str) -> ModuleType:
    """Import with the process's stderr (fd 2) pointed at /dev/null, then restored; Python-level errors
    still raise normally and are printed after the restore."""
    import os
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        return importlib.import_module(module)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` telling the user which extra to install."""
    import os
    import sys

    try:
        top = module.split(".")[0]
        if (top in _NOISY_NATIVE_IMPORTS and "tensorflow" not in sys.modules
                and os.environ.get("CXR_EDGE_VERBOSE_TF") != "1"):
            return _quiet_native_import(module)
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra, purpose = _EXTRAS.get(top, (None, "this feature"))
        hint = f"pip install 'cxr-edge[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtraError(
            f"{purpose} needs the '{top}' package, which is not installed ({exc}). "
            f"Install it with: {hint}"
        ) from exc
