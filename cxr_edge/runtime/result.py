"""One screening result, one JSON shape: the same for ``Screener.predict``, ``cxr-edge predict --json``, the
HTTP service and the kiosk page, so a result read from any of them means the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..decision import MIN_BORDERLINE_BAND, Decision

#: ``status`` of a result: screened, or an input that could not be used (the HTTP status it gets)
OK, UNUSABLE_INPUT = 200, 422


@dataclass
class Explanation:
    """Where the model looked: Grad-CAM of the decided class at the feature map's resolution."""

    target: str  # the class explained (the decided label)
    method: str  # "engine-native" | "tensorflow"
    peak: float  # the raw map's maximum: near zero means the model found nothing to point at
    seconds: float
    cam: np.ndarray | None = None  # raw Grad-CAM (h, w), not normalised; not part of the JSON
    files: dict[str, str] = field(default_factory=dict)  # overlay PNG / raw .npy written by predict --out
    overlay_png_base64: str | None = None  # the service sends the overlay inline
    preview_jpeg_base64: str | None = None  # the image as decoded (longest side <= 1024), for viewers
    heatmap_png_base64: str | None = None  # the coloured map alone, for viewers that blend with their own opacity
    # whether the map shows localised evidence, by the one rule (cxr_edge.runtime.gradcam.map_evidence), and why not;
    # ``weak`` is the older name of "not localised", kept because stored results and worklists (weak_map) read it
    weak: bool | None = None
    localised: bool | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        """With a map, ``localised``/``reason``/``weak`` come from the rule, never from a caller's own test, so every
        front end calls the same map the same thing; a non-finite ``peak`` becomes the largest finite value (JSON)."""
        if self.cam is None:
            return
        from .gradcam import map_evidence

        evidence = map_evidence(self.cam)
        self.localised, self.reason, self.weak = evidence.localised, evidence.reason, evidence.weak
        if not math.isfinite(self.peak):
            self.peak = evidence.peak

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"target": self.target, "method": self.method, "peak": self.peak, "seconds": self.seconds,
                             "shape": list(self.cam.shape) if self.cam is not None else None, "files": dict(self.files)}
        d.update(weak=self.weak, localised=self.localised, reason=self.reason)
        for key in ("overlay_png_base64", "preview_jpeg_base64", "heatmap_png_base64"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


@dataclass
class ScreeningResult:
    index: int  # position in the request / the list of items
    source: str  # file name (never a path from an HTTP client) or a description of the item
    ok: bool
    status: int = OK
    error: str | None = None
    label: str | None = None
    probabilities: dict[str, float] | None = None
    threshold: float | None = None  # the COVID threshold the label was decided with (None: argmax)
    backend: str | None = None
    provider: str | None = None
    precision: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    explanation: Explanation | None = None
    decision: Decision | None = None  # why this label: threshold, margin, borderline, operating point
    preprocess: str | None = None  # which path decoded and resized the image: "cpu" or "gpu"
    decode: str | None = None  # full resolution, or reduced-resolution JPEG decoding and the gate that allowed it
    # the engine's load-time self-check (cxr_edge.self_check): status, where it ran, max |dp| vs FP32; a result
    # from an engine that failed it (run with --self-check warn) says so in every answer
    self_check: dict[str, Any] | None = None

    @classmethod
    def unusable(cls, index: int, source: str, reason: str) -> ScreeningResult:
        """An item that could not be screened (corrupt, truncated, too large...): reported, never raised."""
        return cls(index, source, False, status=UNUSABLE_INPUT, error=reason)

    @classmethod
    def from_probabilities(cls, index: int, source: str, probs: np.ndarray, classes: list[str],
                           threshold: float | None, info=None, timings_ms: dict[str, float] | None = None,
                           operating_point: str | None = None, band: float = MIN_BORDERLINE_BAND) -> ScreeningResult:
        """Label by the one decision rule (:func:`cxr_edge.decision.decide`) and record what decided it."""
        d = Decision.of(probs, classes, threshold, operating_point, band)
        sc = getattr(info, "self_check", None)
        return cls(index, source, True, label=d.label, probabilities={c: float(p) for c, p in zip(classes, probs)},
                   threshold=threshold, backend=getattr(info, "backend", None), provider=getattr(info, "provider", None),
                   precision=getattr(info, "precision", None), timings_ms=dict(timings_ms or {}), decision=d,
                   self_check=self_check_summary(sc))

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "source": self.source, "ok": self.ok, "status": self.status, "error": self.error,
                "label": self.label, "probabilities": self.probabilities, "threshold": self.threshold,
                "backend": self.backend, "provider": self.provider, "precision": self.precision,
                "timings_ms": dict(self.timings_ms),
                "explanation": self.explanation.to_dict() if self.explanation is not None else None,
                "decision": self.decision.to_dict() if self.decision is not None else None,
                "preprocess": self.preprocess, "decode": self.decode, "self_check": self.self_check}


def self_check_summary(outcome) -> dict[str, Any] | None:
    """The part of a load-time self-check every result carries (the full record is in ``/v1/model``)."""
    if outcome is None:
        return None
    return {"status": outcome.status, "where": outcome.where, "max_abs_dprob": outcome.max_abs_dprob,
            "tolerance": outcome.tolerance, "reason": outcome.reason}
