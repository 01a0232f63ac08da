"""Which artifacts exist, what they are called, and which combinations are valid.

One table, checked up front, so a bad request (INT8 TensorRT engine from an FP32 ONNX, an unknown
precision) is refused before any slow work starts, and a request for FP16 never silently yields FP32.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import ConfigError


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Int8Target(str, enum.Enum):
    """The INT8 flavour a target needs (recorded in the manifest).

    TRT: symmetric signed activations and weights (S8S8, zero point 0): all TensorRT accepts.
    CPU: unsigned activations, signed weights (U8S8): what x86 VNNI kernels in ONNX Runtime run fast.
    OV: activations that can be negative as symmetric S8, the others as U8; signed weights. What OpenVINO's
    CPU plugin fuses into its INT8 kernels (a U8 activation with a non-zero zero point, as CPU gives
    ResNetV2's residual sums, is left as a float FakeQuantize); ONNX Runtime runs it, but slower than CPU.
    """

    TRT = "trt"
    CPU = "cpu"
    OV = "ov"

    @property
    def for_cpu_runtimes(self) -> bool:
        return self is not Int8Target.TRT


@dataclass(frozen=True)
class Variant:
    precision: Precision
    int8_target: Int8Target | None = None

    @property
    def tag(self) -> str:
        return f"int8-{self.int8_target.value}" if self.precision is Precision.INT8 else self.precision.value

    def filename(self, stem: str = "model") -> str:
        return f"{stem}.{self.tag}.onnx"


def parse_precisions(text: str, int8_targets: str = "trt,cpu,ov") -> list[Variant]:
    """``"fp32,fp16,int8"`` -> variants; ``int8`` expands to one variant per INT8 target."""
    out: list[Variant] = []
    for raw in (p.strip().lower() for p in text.split(",") if p.strip()):
        if raw.startswith("int8-"):
            raw, targets = "int8", raw[5:]
        else:
            targets = int8_targets
        try:
            prec = Precision(raw)
        except ValueError:
            raise ConfigError(
                f"Unknown precision {raw!r}; choose from fp32, fp16, int8 (or int8-trt / int8-cpu / int8-ov)."
            ) from None
        if prec is Precision.INT8:
            for t in (t.strip().lower() for t in targets.split(",") if t.strip()):
                try:
                    out.append(Variant(prec, Int8Target(t)))
                except ValueError:
                    raise ConfigError(f"Unknown INT8 target {t!r}; choose trt, cpu or ov.") from None
        else:
            out.append(Variant(prec))
    if not out:
        raise ConfigError("No precision requested; pass e.g. --precision fp32,fp16,int8.")
    # fp32 is the reference every gate compares against, so it is always produced first
    uniq = [Variant(Precision.FP32)] + [v for v in dict.fromkeys(out) if v != Variant(Precision.FP32)]
    return uniq
