"""Load-time self-check: does this artifact, on this backend and this machine, still answer like its FP32 model?

Export gates are measured once, on the exporting machine's kernels (or, for TensorRT, on emulated TensorRT
numerics). The deployment machine may round differently: x86 CPUs without VNNI saturate u8 x s8 products
in int16, a GPU picks other tactics, a runtime upgrade changes a kernel. So every artifact's manifest
carries the FP32 model's probabilities on a few deterministic reference images
(:mod:`cxr_edge.reference_inputs`) and how far the artifact itself was from them where it was gated; each
backend answers them again when it loads, and the artifact is refused (or, by choice, run with every
result marked) when it is further from FP32 than its tolerance.

The tolerance is ``min(band, max(0.01, 3 x at_export))``: up to three times the artifact's own distance
from FP32 where it was gated (at least 0.01, float noise and fusion order), and never more than its
borderline band, the disagreement its export gate accepted on real images. The band alone was too loose,
because an INT8 artifact run on saturating AVX2 kernels can stay within it on these images while flipping
top classes on real ones (benchmarks/results/issue25_avx2_demo/): phantoms move less than radiographs, so
a drift of several times the export distance on them is the signal. Where the reference images were already
further than the band at export, the tolerance is what was measured there plus 0.01, so an artifact never
fails on the machine that gated it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .decision import borderline_band
from .manifest_schema import ArtifactManifest, SelfCheckAtExport
from .reference_inputs import GENERATOR, inputs_sha256, reference_inputs

POLICIES = ("refuse", "warn", "off")
DRIFT_FLOOR = 0.01  # float noise, fusion order and FP16 accumulation stay far below this
DRIFT_FACTOR = 3.0  # how much further from FP32 than where it was gated an engine may answer
DEFAULT_POLICY = "refuse"
N_IMAGES = 8


def reference_batch(input_shape: tuple[int, int, int], n: int = N_IMAGES) -> np.ndarray:
    h, w, c = input_shape
    return reference_inputs(h, w, c, n)


def make_record(input_shape: tuple[int, int, int], reference_probs: np.ndarray, artifact_probs: np.ndarray,
                band: float, reference: str, measured_on: str) -> dict[str, Any]:
    """The manifest's ``self_check`` block: FP32 answers on the reference images, and the artifact's own."""
    x = reference_batch(input_shape, len(reference_probs))
    at_export = float(np.abs(np.asarray(artifact_probs, np.float64) - reference_probs).max())
    return {"generator": GENERATOR, "n": int(len(x)), "inputs_sha256": inputs_sha256(x),
            "reference": reference, "reference_probs": np.round(np.asarray(reference_probs, np.float64), 7).tolist(),
            "at_export": {"max_abs_dprob": at_export, "measured_on": measured_on},
            "band": float(band), "tolerance": tolerance_for(at_export, band)}


def tolerance_for(at_export: float, band: float) -> float:
    """How far from FP32 an engine may answer the reference images (module docstring: why these numbers)."""
    tol = min(float(band), max(DRIFT_FLOOR, DRIFT_FACTOR * float(at_export)))
    return tol if tol > at_export else float(at_export) + DRIFT_FLOOR


@dataclass(frozen=True)
class SelfCheckOutcome:
    """What a backend's load-time self-check found; reported by results, ``/v1/model`` and ``doctor``."""

    status: str  # "passed" | "failed" | "not available" | "off"
    where: str  # "<backend>/<ISA or GPU>"
    max_abs_dprob: float | None = None
    tolerance: float | None = None
    n_images: int = 0
    top_class_agreement: float | None = None
    at_export: SelfCheckAtExport | None = None
    reason: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def text(self) -> str:
        if self.status in ("passed", "failed"):
            export = ""
            if self.at_export is not None:
                export = f"; {self.at_export.max_abs_dprob:.3g} at export on {self.at_export.measured_on}"
            rel = "<=" if self.status == "passed" else ">"
            return (f"self-check {self.status} on {self.where}: max |p - p_FP32| {self.max_abs_dprob:.3g} {rel} "
                    f"tolerance {self.tolerance:.3g} on {self.n_images} reference images{export}")
        return f"self-check {self.status} on {self.where}" + (f": {self.reason}" if self.reason else "")

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "where": self.where, "max_abs_dprob": self.max_abs_dprob,
                "tolerance": self.tolerance, "n_images": self.n_images,
                "top_class_agreement": self.top_class_agreement,
                "at_export": self.at_export.to_dict() if self.at_export is not None else None, "reason": self.reason,
                "text": self.text()}


#: why a manifest without a ``self_check`` record cannot be checked
NO_REFERENCE = ("the manifest has no self-check reference (made before cxr-edge recorded one); "
                "re-export or rebuild the artifact to get one")


def check_inputs(manifest: ArtifactManifest, input_shape: tuple[int, int, int]) -> tuple[np.ndarray | None, str | None]:
    """The reference images of a manifest's record, or None and why the check cannot run."""
    rec = manifest.self_check
    if rec is None:
        return None, NO_REFERENCE
    if rec.generator != GENERATOR:
        return None, f"reference generator {rec.generator!r} is not this release's {GENERATOR!r}"
    x = reference_batch(input_shape, rec.n or N_IMAGES)
    if inputs_sha256(x) != rec.inputs_sha256:
        # never compare against answers to other inputs: the generator is integer-only, so this is a bug
        return None, "the reference images generated here differ from those the manifest was made with"
    return x, None


def compare(manifest: ArtifactManifest, probs: np.ndarray, where: str) -> SelfCheckOutcome:
    """Judge a backend's probabilities on the reference images against the manifest's FP32 answers."""
    rec = manifest.self_check
    if rec is None:
        return SelfCheckOutcome("not available", where, reason=NO_REFERENCE)
    ref = np.asarray(rec.reference_probs, np.float64)
    probs = np.asarray(probs, np.float64)
    if probs.shape != ref.shape:
        return SelfCheckOutcome("failed", where, None, None, len(ref),
                                reason=f"answered shape {probs.shape}, the reference has {ref.shape}")
    d = float(np.abs(probs - ref).max())
    # derived by the rule from what was measured, not read from the record's informational 'tolerance'
    # (the manifest's hash and signature are what protect the measured numbers themselves)
    at_export = rec.at_export.max_abs_dprob
    tol = tolerance_for(at_export, rec.band or borderline_band(manifest))
    agree = float((probs.argmax(1) == ref.argmax(1)).mean())
    status = "passed" if np.isfinite(d) and d <= tol else "failed"
    return SelfCheckOutcome(status, where, d, tol, len(ref), agree, rec.at_export)
