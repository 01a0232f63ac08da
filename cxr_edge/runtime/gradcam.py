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


def normalise(cam: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Map a raw CAM to [0, 1]: by a fixed ``scale`` when given (comparable across studies), else by its max.

    A fixed scale keeps a near-empty map on a normal study near zero instead of stretching noise to
    full contrast; per-image max is the common default and what published notebooks show.
    """
    s = scale if scale else float(cam.max())
    return np.clip(cam / s, 0, 1) if s > 0 else np.zeros_like(cam)
