"""Which arithmetic an export gate measures an artifact with: the arithmetic of the runtime it is made for.

A gate that runs an artifact on the exporting machine's kernels judges that machine, not the target: saturating
AVX2 integer kernels put an int8-trt graph far further from FP32 than the exact arithmetic TensorRT uses
(``python benchmarks/gate_numerics.py``, benchmarks/results/gate_numerics/), and on an AVX2 exporter that pushed
the TensorRT artifact down the remedy ladder. So:

- ``int8-trt`` is measured with TensorRT numerics emulated (fake quantisation in float: the same rounded
  INT8 values, summed without saturation, as TensorRT's int32 accumulation does): the same verdict on
  every CPU.
- ``int8-ov`` is measured on OpenVINO's CPU kernels where OpenVINO is installed (the runtime it is made
  for), ``int8-cpu``, FP16 and FP32 on ONNX Runtime's CPU kernels; those depend on the CPU, so the gate
  records the ISA it ran on, and the load-time self-check (:mod:`cxr_edge.self_check`) re-measures where
  the artifact is deployed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cpu_isa import isa_facts
from ..manifest import ArtifactManifest, read_manifest
from ..precision import Int8Target, Precision, Variant
from ..runtime.backends.ort_session import NUMERICS_TEXT, cpu_session, run_batched


@dataclass(frozen=True)
class GateNumerics:
    engine: str  # "onnxruntime" | "openvino"
    mode: str  # "kernels" (this CPU's) | "tensorrt" (emulated, CPU-independent)
    note: str = ""
    isa: Mapping[str, Any] | None = field(default=None)  # set when this CPU's kernels decide the numbers

    @property
    def depends_on_cpu(self) -> bool:
        return self.mode == "kernels"

    def where(self) -> str:
        """``onnxruntime/AVX2`` or ``TensorRT numerics (emulated)``: for reports and self-check records."""
        if not self.depends_on_cpu:
            return "TensorRT numerics (emulated on the CPU)"
        return f"{self.engine}/{(self.isa or {}).get('isa', '?')}"

    def to_dict(self) -> dict[str, Any]:
        text = NUMERICS_TEXT[self.mode] if self.engine == "onnxruntime" else "OpenVINO CPU plugin, its own kernels"
        return {"engine": self.engine, "mode": self.mode, "text": text + (f" ({self.note})" if self.note else ""),
                "depends_on_cpu": self.depends_on_cpu, "where": self.where(),
                "isa": dict(self.isa) if self.isa else None}

    def probs(self, path: Path, x: np.ndarray, manifest: ArtifactManifest | None = None) -> np.ndarray:
        """``path``'s probabilities on ``x`` in this arithmetic; ``manifest``: the artifact's (default: its sidecar's),
        which OpenVINO is opened with."""
        if self.engine == "openvino":
            from ..runtime.backends.openvino import OpenVINOBackend

            with OpenVINOBackend(path, manifest or read_manifest(path, verify=False), self_check="off") as eng:
                return eng.infer_all(x, calibrated=False)
        return run_batched(cpu_session(path, numerics=self.mode), x, ["probs"])["probs"]


def numerics_for(variant: Variant) -> GateNumerics:
    """The arithmetic of the runtime ``variant`` is made for, as closely as this machine can compute it."""
    if variant.precision is Precision.INT8 and variant.int8_target is Int8Target.TRT:
        return GateNumerics("onnxruntime", "tensorrt")
    if variant.precision is Precision.INT8 and variant.int8_target is Int8Target.OV:
        if importlib.util.find_spec("openvino") is not None:
            return GateNumerics("openvino", "kernels", isa=isa_facts())
        return GateNumerics("onnxruntime", "kernels", isa=isa_facts(),
                            note="OpenVINO is not installed where this was exported; OpenVINO's own kernels are "
                                 "measured by the self-check when it loads")
    return GateNumerics("onnxruntime", "kernels", isa=isa_facts())
