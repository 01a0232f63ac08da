"""The precision vocabulary every layer speaks: precisions, INT8 flavours, artifact variants and the gate limits.

Defined once in the core so that export, runtime, bench and the front ends compare enum members instead of
string literals, and a request that names no real variant is refused before any slow work starts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import ConfigError


class Precision(str, enum.Enum):
    """What an artifact's weights and activations are computed in; BF16 is only a CPU runtime's inference hint
    (OpenVINO, ONNX Runtime on AMX), never an exported artifact."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"

    @classmethod
    def of(cls, text: str | None) -> Precision:
        """The precision a manifest or a tag names (``"int8-cpu"`` -> INT8); a missing one is FP32, the reference."""
        if isinstance(text, Precision):
            return text
        if not text:
            return cls.FP32
        try:
            return cls(str(text).split("-", 1)[0].lower())
        except ValueError:
            raise ConfigError(f"Unknown precision {text!r}; choose from {', '.join(p.value for p in cls)}.") from None


#: precisions an artifact can be exported in (BF16 is a runtime hint only)
EXPORTED_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8)


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

    @classmethod
    def from_tag(cls, tag: str) -> Variant:
        """``"int8-cpu"`` -> INT8 for the CPU target, ``"fp16"`` -> FP16; the inverse of :attr:`tag`."""
        prec = Precision.of(tag)
        if prec is Precision.INT8:
            rest = tag.split("-", 1)[1] if "-" in tag else ""
            try:
                return cls(prec, Int8Target(rest.lower()))
            except ValueError:
                raise ConfigError(f"INT8 variant {tag!r} names no INT8 target; use int8-trt, int8-cpu or int8-ov.") from None
        return cls(prec)

    @property
    def tag(self) -> str:
        if self.precision is not Precision.INT8:
            return self.precision.value
        # from_tag and parse_precisions always name the target; an engine's target-less INT8 is tagged by its manifest
        assert self.int8_target is not None, "an INT8 variant names its INT8 target"
        return f"int8-{self.int8_target.value}"

    def filename(self, stem: str = "model") -> str:
        return f"{stem}.{self.tag}.onnx"



#: the INT8 artifacts by tag, one per INT8 target (``int8-trt``, ``int8-cpu``, ``int8-ov``)
INT8_TAGS: tuple[str, ...] = tuple(Variant(Precision.INT8, t).tag for t in Int8Target)
#: the inference-precision hints a CPU runtime (OpenVINO) can run an FP32 artifact in
#: an INT8 artifact with less of its MACs in INT8 than this is "mostly float" (export report, bench): its speed and
#: accuracy are mostly its float parts
MOSTLY_FLOAT_BELOW = 0.9
CPU_HINT_PRECISIONS: tuple[str, ...] = (Precision.FP32.value, Precision.BF16.value)
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
            if prec not in EXPORTED_PRECISIONS:
                raise ValueError(raw)
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


@dataclass(frozen=True)
class GateLimits:
    """How close an artifact must stay to its FP32 reference: the export gates enforce these and the benchmark
    validates its rows against the same numbers, so a row "validated" in a report passed the gate an export would."""

    fp32_max_abs: float = 1e-4
    fp16_max_abs: float = 1e-2
    fp16_min_agreement: float = 0.995
    int8_min_agreement: float = 0.99
    int8_max_auc_drop: float = 0.01
    int8_max_sensitivity_drop: float = 0.01

    def min_agreement(self, precision: Precision | str) -> float:
        """Top-class agreement with FP32 a result in ``precision`` must reach (BF16 is held to FP16's)."""
        prec = Precision.of(precision)
        return {Precision.FP32: 1.0, Precision.FP16: self.fp16_min_agreement, Precision.BF16: self.fp16_min_agreement,
                Precision.INT8: self.int8_min_agreement}[prec]


GATE_LIMITS = GateLimits()
