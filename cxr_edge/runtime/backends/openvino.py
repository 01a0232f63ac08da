"""OpenVINO for x86 CPU and Intel-GPU kiosks, running the same ONNX artifacts.

On CPUs with AVX512_BF16/AMX, OpenVINO's default "FP32" silently computes in bf16. Here the inference
precision is always set explicitly and read back: an fp32 artifact runs as ``fp32`` (forced f32) or,
when asked, as ``bf16``, and results name what actually ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError
from ...extras import require
from ...manifest import Manifest
from ...precision import Precision
from .base import Backend, BackendInfo, BackendOptions

#: OpenVINO's inference-precision hint for each float precision, by its name (an option's text looks it up)
_HINTS = {Precision.FP32.value: "f32", Precision.BF16.value: "bf16", Precision.FP16.value: "f16"}


@dataclass(frozen=True)
class OpenVINOOptions(BackendOptions):
    """OpenVINO's own options beside the common ones (``precision``: fp32, bf16 or fp16, for float artifacts)."""

    ov_device: str = "CPU"  # the OpenVINO device name: "CPU", "GPU", ...
    streams: int | None = None  # None (or 0): one stream; more split a batch over one request per stream


class OpenVINOBackend(Backend):
    name = "openvino"
    Options = OpenVINOOptions
    opts: OpenVINOOptions

    @classmethod
    def tuning_candidates(cls, artifact: Path, manifest: Manifest, *, device: str, batch: int,
                          cores: int) -> list[dict[str, Any]]:
        """All cores or half of them in one stream, and with several cores the batch split over 2 or one-per-core
        streams: which wins differs by CPU and model."""
        out: list[dict[str, Any]] = [{"threads": t} for t in cls._thread_counts(cores)]
        if cores > 1:
            out += [{"threads": cores, "streams": s} for s in sorted({2, cores}) if s <= cores]
        return out

    def _load(self) -> BackendInfo:
        ov = require("openvino")
        core = ov.Core()
        device = self.opts.ov_device
        artifact_prec = self.manifest.precision
        int8 = artifact_prec is Precision.INT8
        want: str = Precision.INT8.value if int8 else (self.opts.precision or artifact_prec.value)
        config: dict[str, Any]
        if int8:
            config = {}
        else:
            if want not in _HINTS:
                raise ConfigError(f"OpenVINO runs fp32 artifacts as fp32 or bf16 (or fp16 on GPU), not {want!r}.")
            if want == Precision.BF16 and "BF16" not in core.get_property(device, "OPTIMIZATION_CAPABILITIES"):
                raise ConfigError(f"OpenVINO device {device} has no bf16 support; use precision fp32.")
            config = {"INFERENCE_PRECISION_HINT": _HINTS[want]}
        if self.opts.threads:
            config["INFERENCE_NUM_THREADS"] = self.opts.threads
        streams = self.opts.streams or 1
        if streams < 1:
            raise ConfigError(f"OpenVINO streams must be >= 1, got {streams}.")
        if self.opts.threads:
            streams = min(streams, self.opts.threads)  # a stream needs at least one thread
        if streams > 1:  # the plugin splits the cores into streams; a batch is split over one request per stream
            config.update({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams})
        self._core, self._device, self._config, self._streams = core, device, config, streams
        self._model = core.read_model(self.model_bytes if self.model_bytes is not None else str(self.artifact))
        self._variants: dict[frozenset, _Compiled] = {}
        # screening asks for probs only; the full set (Grad-CAM's features too) is compiled when first asked for
        first = self._variant(frozenset(["probs"] if "probs" in self.outputs else self.outputs))
        hint = first.compiled.get_property("INFERENCE_PRECISION_HINT")
        actual_hint = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        if not int8 and _HINTS[want] != actual_hint:
            raise ConfigError(f"OpenVINO was asked for {want} but compiled for {actual_hint}.")
        return BackendInfo("openvino", f"OpenVINO {device}", want, device.lower(),
                           {"inference_precision_hint": actual_hint, "artifact_precision": artifact_prec.value,
                            "openvino": ov.__version__, "streams": streams})

    def _variant(self, names: frozenset) -> _Compiled:
        """The model compiled for exactly these outputs (compiled on first use, then kept).

        Screening asks for ``probs`` only; Grad-CAM also for ``features``. A model compiled for both
        transposes and converts the feature map on every call, which costs screening a large share of its
        throughput.
        """
        if names not in self._variants:
            ov = require("openvino")
            model = self._model
            if names != frozenset(self.outputs):
                keep = [r for r in model.get_results() if names & set(r.input(0).get_source_output().get_names())]
                model = ov.Model(keep, model.get_parameters(), f"{model.get_friendly_name()}_{'_'.join(sorted(names))}")
            self._variants[names] = _Compiled(self._core.compile_model(model, self._device, self._config),
                                              self._streams)
        return self._variants[names]

    def _infer(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        return self._variant(frozenset(outputs)).infer(batch, outputs)

    def _close(self) -> None:
        self._variants = {}
        self._model = None


class _Compiled:
    """One compiled model with its synchronous request and, with several streams, one request per stream.

    The requests are started and waited on from the caller's thread, with no Python callback: Python code
    on OpenVINO's own threads can trigger the garbage collector there, and a collected OpenVINO object
    (an async queue in a reference cycle) then joins that thread from itself and aborts the process
    ("Resource deadlock avoided"; it did, in this project's test suite).
    """

    def __init__(self, compiled, streams: int):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.ports = {o.get_any_name(): o for o in compiled.outputs}
        self.stream_requests = [compiled.create_infer_request() for _ in range(streams)] if streams > 1 else []

    def infer(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        if not self.stream_requests or len(batch) == 1:
            res = self.request.infer({0: batch})
            return {n: np.asarray(res[self.ports[n]]).copy() for n in outputs}
        # several streams: one request per stream, each on a contiguous slice, results put back in order
        chunks = [c for c in np.array_split(batch, min(len(batch), len(self.stream_requests))) if len(c)]
        running = list(zip(self.stream_requests, chunks))
        for request, chunk in running:
            request.start_async({0: chunk})
        for request, _ in running:
            request.wait()
        return {n: np.concatenate([r.get_tensor(self.ports[n]).data.copy() for r, _ in running]) for n in outputs}
