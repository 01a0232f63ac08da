"""Engine-native Grad-CAM: the gradient through the classifier head in closed form, in NumPy.

Exported artifacts output the last conv layer's activations (``features``); the layers after it are
a chain of pooling/flatten/dense/ReLU/batch-norm/dropout (see :mod:`cxr_edge.runtime.head`, where each
op class carries its forward pass and its gradient), whose gradient is exact and cheap to compute by
hand. So Grad-CAM runs on ONNX Runtime, OpenVINO or
TensorRT at any precision, with no TensorFlow and no second pass through the network.

Grad-CAM (Selvaraju et al.): weights alpha_k = mean over space of d y_c / d A_k, where y_c is the
pre-softmax score of class c and A the feature map; cam = ReLU(sum_k alpha_k A_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .head import HeadOp


@dataclass
class CamResult:
    cam: np.ndarray  # (N, h, w) raw Grad-CAM at feature-map resolution, not normalised
    target: np.ndarray  # (N,) class index explained
    score: np.ndarray  # (N,) pre-softmax score of that class


def _forward_cache(ops: list[HeadOp], x: np.ndarray):
    """Forward pass keeping each op's input, dense pre-activation and output for the backward pass."""
    cache = []
    for k, op in enumerate(ops):
        inp = x
        x, pre = op.forward(x, last=k == len(ops) - 1, logits=True)
        cache.append((inp, pre, x))
    return x, cache  # x: logits of the last dense layer


def head_gradient(ops: list[HeadOp], features: np.ndarray, target=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d y_target / d features, target indices, target scores); target None = top class."""
    # float32 throughout: upcasting a large dense kernel to float64 would copy it on every call
    feats = features.astype(np.float32, copy=False)
    logits, cache = _forward_cache(ops, feats)
    n = len(feats)
    if target is None:
        target = logits.argmax(1)
    target = np.broadcast_to(np.asarray(target), (n,)).astype(int)
    grad = np.zeros_like(logits)
    grad[np.arange(n), target] = 1.0
    for k in range(len(ops) - 1, -1, -1):
        inp, pre, out = cache[k]
        grad = ops[k].backward(grad, inp, pre, out, last=k == len(ops) - 1)
    return grad, target, logits[np.arange(n), target]


def gradcam(ops: list[HeadOp], features: np.ndarray, target=None) -> CamResult:
    grads, target, score = head_gradient(ops, features, target)
    alpha = grads.mean(axis=(1, 2))  # (N, K)
    cam = np.maximum(np.einsum("nhwk,nk->nhw", features.astype(np.float32, copy=False), alpha), 0)
    return CamResult(cam.astype(np.float32), target, score.astype(np.float32))


#: a raw map whose peak is below this carries no evidence: the decided class's score barely depends on any region
#: (a saturated probability); divided by its own maximum it would stretch near-zero values to full colour
WEAK_CAM_PEAK = 1e-3
#: a raw map whose (max - min) is below this fraction of its max is flat: it rates every region alike (a constant
#: map), and divided by its own maximum it would paint the whole image at the top of the colour scale
MIN_CAM_CONTRAST = 0.1


@dataclass(frozen=True)
class MapEvidence:
    """What a raw Grad-CAM map can be shown as: localised evidence, or not (then ``reason`` says why)."""

    localised: bool
    reason: str | None  # why the map shows no localised evidence; None when it does
    peak: float  # the largest finite value (0.0 when there is none): what captions and JSON report

    @property
    def weak(self) -> bool:
        """The older name of "no localised evidence" (``explanation.weak``, a job's ``weak_map``)."""
        return not self.localised


def map_evidence(cam: np.ndarray) -> MapEvidence:
    """The one rule that decides whether a raw (not normalised) map is drawn in colour anywhere.

    A map shows localised evidence only when all three hold:

    1. it has values and every one is finite (a NaN or inf means the computation overflowed: nothing it shows can
       be trusted);
    2. its peak is at least ``WEAK_CAM_PEAK`` = 1e-3 (below it the result barely depends on any region; an all-zero
       map, peak 0, is the common case of a saturated probability);
    3. its spread, max - min, is at least ``MIN_CAM_CONTRAST`` = 0.1 (10 %) of its peak (below it the map is flat,
       e.g. a constant map, and rates every region alike).

    Otherwise it shows "no localised evidence": overlays, heatmaps and the DICOM Secondary Capture paint no colour
    and say so. The rule reads the raw map only, so it is the same with a fixed ``--cam-scale`` as without one.
    """
    cam = np.asarray(cam)
    if cam.size == 0:
        return MapEvidence(False, "the map is empty (no values)", 0.0)
    finite = np.isfinite(cam)
    values = cam[finite]
    peak = float(values.max()) if values.size else 0.0
    if not finite.all():
        bad = int(cam.size - values.size)
        return MapEvidence(False, f"{bad} of {cam.size} map values are not finite (NaN/inf), so the map cannot be "
                                  "trusted", peak)
    if peak < WEAK_CAM_PEAK:
        return MapEvidence(False, f"the result barely depends on any region (peak {peak:.1e} < {WEAK_CAM_PEAK:g})",
                           peak)
    spread = (peak - float(values.min())) / peak
    if spread < MIN_CAM_CONTRAST:
        return MapEvidence(False, f"the map rates every region alike (max - min is {spread:.0%} of the peak "
                                  f"{peak:.1e}, below {MIN_CAM_CONTRAST:.0%})", peak)
    return MapEvidence(True, None, peak)


def normalise(cam: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Map a raw CAM to [0, 1]: by a fixed ``scale`` when given (comparable across studies), else by its max.

    A fixed scale keeps a near-empty map on a normal study near zero instead of stretching noise to
    full contrast; per-image max is the common default and what published notebooks show. Non-finite
    values count as 0 so a broken map never crashes a renderer (:func:`map_evidence` flags it).
    """
    cam = np.where(np.isfinite(cam), cam, 0).astype(cam.dtype, copy=False)
    s = scale if scale else (float(cam.max()) if cam.size else 0.0)
    return np.clip(cam / s, 0, 1) if s > 0 else np.zeros_like(cam)
