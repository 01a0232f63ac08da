"""Which arithmetic an export gate measures an artifact with: the arithmetic of the runtime it is made for.

A gate that runs an artifact on the exporting machine's kernels judges that machine, not the target:
the small CNN's int8-trt graph was max |dp| 0.060 from FP32 (86.5% top-class agreement) on an AVX2-only
EPYC's fused integer kernels, which saturate, and 0.003 (99.5%) with exact arithmetic, on 200 real images
(``python benchmarks/gate_numerics.py``, benchmarks/results/gate_numerics); issue 25 saw an AVX2 exporter
push the TensorRT artifact down the remedy ladder to 13% of its MACs in INT8. So:

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

    def probs(self, path: Path, x: np.ndarray, manifest: Mapping[str, Any] | None = None) -> np.ndarray:
        if self.engine == "openvino":
            from ..runtime.backends.openvino import OpenVINOBackend

            with OpenVINOBackend(path, dict(manifest or {}), self_check="off") as eng:
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
