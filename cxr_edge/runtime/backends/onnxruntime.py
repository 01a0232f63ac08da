"""ONNX Runtime: TensorRT EP > CUDA EP > CPU, and a truthful report of which one actually runs.

onnxruntime-gpu lists the CUDA and TensorRT providers even where their libraries are missing and
then silently runs on the CPU. So the session's providers are read back after creation; with
``device="cuda"`` (``--require-gpu``) a fallback is an error instead of a surprise.
"""

from __future__ import annotations

import logging

import numpy as np

from ...errors import ConfigError
from ...extras import require
from .base import Backend, BackendInfo

log = logging.getLogger(__name__)

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
GPU_PROVIDERS = {PROVIDERS["tensorrt"], PROVIDERS["cuda"]}


class ProviderFallbackError(ConfigError):
    """A GPU provider was required but the session runs on the CPU."""


def requested_providers(device: str, providers: list[str] | None, available: list[str]) -> list[str]:
    """Provider names in preference order for ``device`` ('auto' | 'cpu' | 'cuda')."""
    if providers:
        names = [PROVIDERS.get(p, p) for p in providers]
    elif device == "cpu":
        names = [PROVIDERS["cpu"]]
    elif device in ("auto", "cuda"):
        names = [PROVIDERS["tensorrt"], PROVIDERS["cuda"], PROVIDERS["cpu"]]
    else:
        raise ConfigError(f"Unknown device {device!r}; use auto, cpu or cuda.")
    missing = [n for n in names if n not in available and n != PROVIDERS["cpu"]]
    chosen = [n for n in names if n in available]
    if device == "cuda" and not (set(chosen) & GPU_PROVIDERS):
        raise ProviderFallbackError(
            f"Could not find the requested execution provider. Requested: {names}; available: {available}. "
            "Install onnxruntime-gpu (pip install 'cxr-edge[gpu]') on a machine with CUDA, or use device='cpu'."
        )
    if missing and device == "auto":
        log.debug("providers not available here: %s", missing)
    return chosen or [PROVIDERS["cpu"]]


class OnnxRuntimeBackend(Backend):
    formats = ("onnx",)
    name = "onnxruntime"

    def _load(self) -> BackendInfo:
        ort = require("onnxruntime")
        device = self.options.get("device", "auto")
        available = ort.get_available_providers()
        names = requested_providers(device, self.options.get("providers"), available)
        provider_options = []
        for n in names:
            if n == PROVIDERS["tensorrt"]:
                from ...export.tensorrt_build import ort_tensorrt_ep_options

                prec = self.manifest.get("precision", "fp32")
                cache = self.options.get("trt_cache_dir") or str(self.artifact.parent / "trt_cache")
                provider_options.append(ort_tensorrt_ep_options(self.manifest, prec, cache))
            else:
                provider_options.append({})
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.options.get("threads"):
            so.intra_op_num_threads = int(self.options["threads"])
        if self.options.get("spin") is False:
            # ORT's intra-op threads busy-wait between calls by default; in a service whose decode
            # threads share the same few cores, that spinning takes CPU the decoders need
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.artifact), so, providers=names, provider_options=provider_options)
        actual = self.session.get_providers()
        used = actual[0] if actual else "unknown"
        if device == "cuda" and used not in GPU_PROVIDERS:
            raise ProviderFallbackError(
                f"ONNX Runtime fell back to {used} although {names[0]} was requested (CUDA/TensorRT libraries "
                "missing or no GPU visible). Fix the CUDA installation, or run with device='cpu'."
            )
        if used not in GPU_PROVIDERS and any(n in GPU_PROVIDERS for n in names):
            log.warning("GPU providers %s were requested but ONNX Runtime runs on %s", names[:-1], used)
        self.input_name = self.session.get_inputs()[0].name
        return BackendInfo("onnxruntime", used, self.manifest.get("precision", "fp32"),
                           "cuda" if used in GPU_PROVIDERS else "cpu",
                           {"requested": names, "session_providers": actual, "onnxruntime": ort.__version__})

    def _infer(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        res = self.session.run(outputs, {self.input_name: batch})
        return dict(zip(outputs, res))

    def _close(self) -> None:
        self.session = None
