"""Accuracy gates: every exported artifact must give the same answers as its FP32 reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..classes import COVID
from ..decision import decide
from ..evaluation.criteria import accepted, agreement_verdict
from ..manifest_schema import GateRecord
from ..precision import GATE_LIMITS, Precision

FP32_MAX_ABS = GATE_LIMITS.fp32_max_abs
FP16_MAX_ABS = GATE_LIMITS.fp16_max_abs
FP16_MIN_AGREEMENT = GATE_LIMITS.fp16_min_agreement
INT8_MIN_AGREEMENT = GATE_LIMITS.int8_min_agreement
INT8_MAX_AUC_DROP = GATE_LIMITS.int8_max_auc_drop
INT8_MAX_SENS_DROP = GATE_LIMITS.int8_max_sensitivity_drop


@dataclass
class GateResult:
    name: str
    passed: bool
    n_images: int
    metrics: dict
    limits: dict
    failures: list[str]
    numerics: dict | None = None  # how the artifact's answers were computed (export/gate_numerics.py)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_record(self) -> GateRecord:
        """The gate as the manifest records it (typed and checked like any manifest part)."""
        return GateRecord.from_dict(self.to_dict(), "gate")

    def summary(self) -> str:
        m = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items())
        verdict = "PASSED" if self.passed else "FAILED: " + "; ".join(self.failures)
        where = f" ({self.numerics['where']})" if self.numerics else ""
        return f"{self.name} gate on {self.n_images} images{where}: {m} -> {verdict}"


def _agreement(ref: np.ndarray, probs: np.ndarray) -> float:
    return float((ref.argmax(1) == probs.argmax(1)).mean())


def _check(name, n, metrics, limits, rules) -> GateResult:
    failures = [msg for ok, msg in rules if not ok]
    return GateResult(name, not failures, n, metrics, limits, failures)


def fp32_parity(ref: np.ndarray, probs: np.ndarray, atol: float = FP32_MAX_ABS) -> GateResult:
    d = float(np.abs(ref - probs).max())
    agree = _agreement(ref, probs)
    return _check(Precision.FP32.value, len(ref), {"max_abs_dprob": d, "top_class_agreement": agree},
                  {"max_abs_dprob": atol, "top_class_agreement": 1.0},
                  [(d <= atol, f"max |dprob| {d:.2e} > {atol:.0e}"),
                   (agree == 1.0, f"top class differs on {(1 - agree) * len(ref):.0f} images")])


def fp16_gate(ref: np.ndarray, probs: np.ndarray) -> GateResult:
    d = float(np.abs(ref - probs).max())
    agree = _agreement(ref, probs)
    return _check(Precision.FP16.value, len(ref), {"max_abs_dprob": d, "top_class_agreement": agree},
                  {"max_abs_dprob": FP16_MAX_ABS, "top_class_agreement": FP16_MIN_AGREEMENT},
                  [(d <= FP16_MAX_ABS, f"max |dprob| {d:.2e} > {FP16_MAX_ABS}"),
                   (agree >= FP16_MIN_AGREEMENT, f"top-class agreement {agree:.4f} < {FP16_MIN_AGREEMENT}")])


def _auc(y: np.ndarray, probs: np.ndarray, classes) -> float | None:
    from sklearn.metrics import roc_auc_score

    k = list(classes).index(COVID) if COVID in classes else None
    cols = [k] if k is not None else range(len(classes))
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in cols if 0 < (y == c).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else None


def _sensitivity(y: np.ndarray, probs: np.ndarray, classes, threshold) -> float | None:
    if COVID not in classes or not (y == list(classes).index(COVID)).any():
        return None
    ci = list(classes).index(COVID)
    return float((decide(probs, classes, threshold)[y == ci] == ci).mean())


def int8_gate(ref: np.ndarray, probs: np.ndarray, y_true: np.ndarray, classes, threshold: float | None,
              split: str | None = "validation") -> GateResult:
    """On labelled validation images: agreement with FP32, ROC-AUC drop, COVID sensitivity drop."""
    y_true = np.asarray(y_true)
    agree = _agreement(ref, probs)
    auc_ref, auc_q = _auc(y_true, ref, classes), _auc(y_true, probs, classes)
    sens_ref, sens_q = _sensitivity(y_true, ref, classes, threshold), _sensitivity(y_true, probs, classes, threshold)
    # each is None when the labels cannot measure it, which is the same for both sets of probabilities
    auc_drop = None if auc_ref is None or auc_q is None else auc_ref - auc_q
    sens_drop = None if sens_ref is None or sens_q is None else sens_ref - sens_q
    flips = int((decide(ref, classes, threshold) != decide(probs, classes, threshold)).sum())
    metrics = {"top_class_agreement": agree, "auc_fp32": auc_ref, "auc_int8": auc_q, "auc_drop": auc_drop,
               "covid_sensitivity_fp32": sens_ref, "covid_sensitivity_int8": sens_q, "sensitivity_drop": sens_drop,
               "decision_flips": flips, "max_abs_dprob": float(np.abs(ref - probs).max())}
    verdict = agreement_verdict(int(round(agree * len(ref))), len(ref), INT8_MIN_AGREEMENT, split)
    metrics["agreement_verdict"] = verdict["text"]
    return _check(Precision.INT8.value, len(ref), metrics,
                  {"top_class_agreement": INT8_MIN_AGREEMENT, "auc_drop": INT8_MAX_AUC_DROP,
                   "sensitivity_drop": INT8_MAX_SENS_DROP},
                  [(accepted(verdict), verdict["text"]),
                   (auc_drop is None or auc_drop <= INT8_MAX_AUC_DROP, f"ROC-AUC drop {auc_drop} > {INT8_MAX_AUC_DROP}"),
                   (sens_drop is None or sens_drop <= INT8_MAX_SENS_DROP + 1e-12,
                    f"COVID sensitivity drop {sens_drop} > {INT8_MAX_SENS_DROP}")])
