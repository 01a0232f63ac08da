"""Turning probabilities into a screening decision at an operating threshold.

A triage box is tuned for COVID sensitivity, not for accuracy: the threshold on p(COVID) is
chosen on validation data for a target sensitivity and stored in the manifest. Below it, the
decision is the most probable of the remaining classes. NumPy only, so the runtime can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .classes import COVID
from .manifest_schema import ArtifactManifest, GateRecord, OperatingPoint


def choose_threshold(is_covid: np.ndarray, p_covid: np.ndarray, target_sensitivity: float = 0.95) -> dict:
    """Highest threshold whose sensitivity on these labels is >= target, with what it achieves."""
    is_covid = np.asarray(is_covid, bool)
    p_covid = np.asarray(p_covid, np.float64)
    pos = np.sort(p_covid[is_covid])[::-1]
    if len(pos) == 0 or is_covid.all():
        return {"threshold": 0.5, "target_sensitivity": target_sensitivity, "chosen_on": "default (no positives and negatives)"}
    k = max(1, math.ceil(target_sensitivity * len(pos)))
    kth = float(pos[k - 1])
    # Midway to the next lower score rather than exactly on the k-th positive: a threshold equal to
    # a case's score would flip on the last-bit differences between Keras, ONNX Runtime and TensorRT.
    below = p_covid[p_covid < kth]
    t = float((kth + below.max()) / 2) if len(below) else kth / 2
    pred = p_covid >= t
    return {
        "threshold": t,
        "target_sensitivity": target_sensitivity,
        "sensitivity": float(pred[is_covid].mean()),
        "specificity": float((~pred[~is_covid]).mean()),
        "n_positive": int(is_covid.sum()),
        "n_negative": int((~is_covid).sum()),
    }


def calibrated(probs: np.ndarray, temperature: float | None, logp: np.ndarray | None = None) -> np.ndarray:
    """softmax(log p / T): probabilities re-calibrated with a temperature fitted on a site's data (``cxr-edge
    calibrate --temperature``). The ranking, and so the ROC, is unchanged; T > 1 softens over-confident output."""
    probs = np.asarray(probs, dtype=np.float64)
    if not temperature or temperature == 1.0:
        return probs
    z = (np.log(np.clip(probs, 1e-12, 1.0)) if logp is None else logp) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def decide(probs: np.ndarray, classes, threshold: float | None) -> np.ndarray:
    """Class index per row: COVID when p(COVID) >= threshold, else argmax of the other classes."""
    probs = np.asarray(probs)
    classes = list(classes)
    if threshold is None or COVID not in classes:
        return probs.argmax(axis=1)
    ci = classes.index(COVID)
    others = probs.copy()
    others[:, ci] = -np.inf
    return np.where(probs[:, ci] >= threshold, ci, others.argmax(axis=1))


#: the smallest half-width of the borderline band around the threshold (absolute probability)
MIN_BORDERLINE_BAND = 0.05


def borderline_band(source: ArtifactManifest | GateRecord | None) -> float:
    """Half-width of the band around the threshold inside which a decision is reported as borderline.

    Defined per artifact (its manifest, or the gate record about to go into one) as the larger of 0.05 and the
    largest |p - p_FP32| its export gate measured: a result closer to the threshold than the artifact's own
    disagreement with its FP32 model could have gone the other way on another precision or engine, so it is
    shown as uncertain, not hidden.
    """
    gate = source.gate if isinstance(source, ArtifactManifest) else source
    measured = gate.max_abs_dprob if gate is not None else None
    return max(MIN_BORDERLINE_BAND, measured) if measured is not None else MIN_BORDERLINE_BAND


def describe_operating_point(op: OperatingPoint | None) -> str | None:
    """'95% sensitivity on validation (n+ = 54)' or 'site calibration ...' from a manifest's operating_point."""
    if op is None or op.threshold is None:
        return None
    where = "validation" if not op.chosen_on or op.chosen_on in ("val", "validation") else op.chosen_on
    target = op.target_sensitivity
    text = f"{100 * target:.0f}% sensitivity on {where}" if target is not None else f"chosen on {where}"
    if op.n_positive is not None:
        text += f" (n+ = {op.n_positive})"
    return text


@dataclass(frozen=True)
class Decision:
    """Why a label was given, in one vocabulary for the CLI, JSON, the service and the kiosk.

    ``margin`` is p(COVID) minus the threshold (positive: at or above it); ``borderline`` is true when
    it lies within ``band`` of zero. Without a threshold (no COVID class, or none chosen), the rule is
    argmax and margin/borderline are None.
    """

    label: str
    probability: float  # of the label
    rule: str  # "threshold" | "argmax"
    threshold: float | None = None
    covid_probability: float | None = None
    margin: float | None = None
    borderline: bool | None = None
    band: float | None = None
    operating_point: str | None = None

    @classmethod
    def of(cls, probs, classes, threshold: float | None, operating_point: str | None = None,
           band: float = MIN_BORDERLINE_BAND) -> Decision:
        probs = np.asarray(probs, dtype=np.float64)
        classes = list(classes)
        k = int(decide(probs[None], classes, threshold)[0])
        if threshold is None or COVID not in classes:
            return cls(classes[k], float(probs[k]), "argmax")
        p = float(probs[classes.index(COVID)])
        margin = p - threshold
        return cls(classes[k], float(probs[k]), "threshold", float(threshold), p, margin, abs(margin) < band, band,
                   operating_point)

    def reason(self) -> str:
        """Why this label, floats rounded: 'COVID: p 0.50 >= threshold 0.47 (operating point: ...)'."""
        if self.rule == "argmax":
            return f"{self.label}: most probable class (p {self.probability:.2f}); no COVID threshold is set"
        op = f" (operating point: {self.operating_point})" if self.operating_point else ""
        if self.label == COVID:
            line = f"COVID: p {self.covid_probability:.2f} >= threshold {self.threshold:.2f}{op}"
        else:
            line = (f"{self.label}: p(COVID) {self.covid_probability:.2f} < threshold {self.threshold:.2f}{op}; "
                    f"{self.label} is the most probable other class (p {self.probability:.2f})")
        return line

    def text(self) -> str:
        """The decision line people read: the reason, and the borderline warning when it applies."""
        line = self.reason()
        if self.borderline:
            line += f". Borderline: within {self.band:.2f} of the threshold, treat as uncertain"
        return line

    def to_dict(self) -> dict:
        return {"label": self.label, "probability": self.probability, "rule": self.rule, "threshold": self.threshold,
                "covid_probability": self.covid_probability, "margin": self.margin, "borderline": self.borderline,
                "borderline_band": self.band, "operating_point": self.operating_point, "reason": self.reason(),
                "text": self.text()}
