"""ONNX Runtime: TensorRT EP > CUDA EP > CPU, and a truthful report of which one actually runs.

onnxruntime-gpu lists the CUDA and TensorRT providers even where their libraries are missing and
then silently runs on the CPU. So the session's providers are read back after creation; with
``device="cuda"`` (``--require-gpu``) a fallback is an error instead of a surprise. Which providers an
artifact may use, and their options, live in :mod:`cxr_edge.runtime.backends.ort_providers`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...extras import require
from ...manifest import Manifest
from .base import Backend, BackendInfo, BackendOptions
from .ort_providers import (
    GPU_PROVIDERS,
    PROVIDERS,
    ProviderFallbackError,
    cuda_ep_options,
    preload_tensorrt_libs,
    private_cache_dir,
    profile_for,
    requested_providers,
    tensorrt_ep_options,
)

log = logging.getLogger(__name__)

__all__ = ["OnnxRuntimeBackend", "ProviderFallbackError", "requested_providers"]


@dataclass(frozen=True)
class OnnxRuntimeOptions(BackendOptions):
    """ONNX Runtime's own options beside the common ones (``max_batch``: the TensorRT EP's profile; ``trusted``: no
    engine cache)."""

    providers: list[str] | None = None  # explicit provider names, instead of those ``device`` implies
    trt_cache_dir: str | Path | None = None  # the TensorRT EP's engine cache (default: a private one per artifact)
    cudnn_conv_algo_search: str | None = None  # the CUDA EP's search ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


class OnnxRuntimeBackend(Backend):
    """Options: :class:`OnnxRuntimeOptions`."""

    name = "onnxruntime"
    Options = OnnxRuntimeOptions
    opts: OnnxRuntimeOptions

    @classmethod
    def tuning_candidates(cls, artifact: Path, manifest: Manifest, *, device: str, batch: int,
                          cores: int) -> list[dict[str, Any]]:
        """All cores or half of them: which wins differs by CPU and model."""
        return [{"threads": t} for t in cls._thread_counts(cores)]

    def _load(self) -> BackendInfo:
        ort = require("onnxruntime")
        device = self.opts.device
        available = ort.get_available_providers()
        names = requested_providers(device, self.opts.providers, available, self.manifest)
        trt_libs = preload_tensorrt_libs() if PROVIDERS["tensorrt"] in names else None
        self._profile = profile_for(self.opts.max_batch)
        self._trt_cache: str | None = None
        provider_options = [self._provider_options(n) for n in names]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.opts.threads:
            so.intra_op_num_threads = self.opts.threads
        if self.opts.spin is False:
            # ORT's intra-op threads busy-wait between calls by default; in a service whose decode
            # threads share the same few cores, that spinning takes CPU the decoders need
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = self.model_bytes if self.model_bytes is not None else str(self.artifact)
        self.session = ort.InferenceSession(model, so, providers=names, provider_options=provider_options)
        actual = self.session.get_providers()
        used = actual[0] if actual else "unknown"
        if device == "cuda" and used not in GPU_PROVIDERS:
            raise ProviderFallbackError(
                f"ONNX Runtime fell back to {used} although {names[0]} was requested (CUDA/TensorRT libraries "
                "missing or no GPU visible). Fix the CUDA installation (cxr-edge doctor says what is missing), "
                "or run with --device cpu."
            )
        if used not in GPU_PROVIDERS and any(n in GPU_PROVIDERS for n in names):
            log.warning("GPU providers %s were requested but ONNX Runtime runs on %s",
                        [n for n in names if n in GPU_PROVIDERS], used)
        self._trt_active = used == PROVIDERS["tensorrt"]
        self.input_name = self.session.get_inputs()[0].name
        details = {"requested": names, "session_providers": actual, "onnxruntime": ort.__version__}
        if trt_libs is not None:
            details["tensorrt_libraries"] = trt_libs
        if self._trt_active:
            details["tensorrt_profile"] = list(self._profile)
            details["engine_cache"] = self._trt_cache
        return BackendInfo("onnxruntime", used, self.manifest.precision.value,
                           "cuda" if used in GPU_PROVIDERS else "cpu", details)

    def _provider_options(self, name: str) -> dict:
        if name == PROVIDERS["tensorrt"]:
            cache = None
            if not self.opts.trusted:  # signed-only deployments never load cached native engines
                cache = self.opts.trt_cache_dir or private_cache_dir(self.manifest.sha256 or "")
            self._trt_cache = str(cache) if cache else None
            return tensorrt_ep_options(self.manifest, self._profile, cache)
        if name == PROVIDERS["cuda"]:
            return cuda_ep_options(cudnn_conv_algo_search=self.opts.cudnn_conv_algo_search)
        return {}

    def batch_range(self) -> tuple[int, int]:
        if getattr(self, "_trt_active", False):  # the TensorRT EP's engine takes only its profile's batches
            return (self._profile[0], self._profile[2])
        return super().batch_range()

    def _infer(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        res = self.session.run(outputs, {self.input_name: batch})
        return dict(zip(outputs, res))

    def _close(self) -> None:
        self.session = None
