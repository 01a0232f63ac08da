"""Engine-native Grad-CAM: the gradient through the classifier head in closed form, in NumPy.

Exported artifacts output the last conv layer's activations (``features``); the layers after it are
a chain of pooling/flatten/dense/ReLU/batch-norm/dropout (see :mod:`cxr_edge.runtime.head`), whose
gradient is exact and cheap to compute by hand. So Grad-CAM runs on ONNX Runtime, OpenVINO or
TensorRT at any precision, with no TensorFlow and no second pass through the network.

Grad-CAM (Selvaraju et al.): weights alpha_k = mean over space of d y_c / d A_k, where y_c is the
pre-softmax score of class c and A the feature map; cam = ReLU(sum_k alpha_k A_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .head import HeadOp, apply_op


@dataclass
class CamResult:
    cam: np.ndarray  # (N, h, w) raw Grad-CAM at feature-map resolution, not normalised
    target: np.ndarray  # (N,) class index explained
    score: np.ndarray  # (N,) pre-softmax score of that class


def _forward_cache(ops: list[HeadOp], x: np.ndarray):
    """Forward pass keeping each op's input (and dense pre-activations) for the backward pass."""
    cache = []
    for k, op in enumerate(ops):
        inp = x
        x, pre = apply_op(op, x, last=k == len(ops) - 1, logits=True)
        cache.append((inp, pre, x))
    return x, cache  # x: logits of the last dense layer


def _maxpool_backward(inp: np.ndarray, out: np.ndarray, grad: np.ndarray, pool: int, stride: int) -> np.ndarray:
    """Route each window's gradient to its (first) maximum, as TensorFlow's MaxPoolGrad does."""
    g = np.zeros_like(inp)
    oh, ow = out.shape[1:3]
    taken = np.zeros(out.shape, bool)
    for dy in range(pool):
        for dx in range(pool):
            win = inp[:, dy : dy + stride * oh : stride, dx : dx + stride * ow : stride, :]
            hit = (win == out) & ~taken
            taken |= hit
            g[:, dy : dy + stride * oh : stride, dx : dx + stride * ow : stride, :] += np.where(hit, grad, 0)
    return g


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
        op, (inp, pre, out) = ops[k], cache[k]
        if op.kind == "dense":
            if k != len(ops) - 1 and op.params.get("activation") == "relu":
                grad = grad * (pre > 0)
            grad = grad @ op.arrays["kernel"].T
        elif op.kind == "batchnorm":
            grad = grad * op.arrays["scale"]
        elif op.kind == "relu":
            grad = grad * (inp > 0)
        elif op.kind == "flatten":
            grad = grad.reshape(inp.shape)
        elif op.kind == "gap":
            h, w = inp.shape[1:3]
            grad = np.broadcast_to(grad[:, None, None, :] / (h * w), inp.shape).copy()
        elif op.kind == "gmp":
            mask = inp == inp.max(axis=(1, 2), keepdims=True)
            first = mask & (np.cumsum(np.cumsum(mask, 1), 2) == 1)
            grad = np.where(first, grad[:, None, None, :], 0.0)
        elif op.kind == "maxpool":
            grad = _maxpool_backward(inp, out, grad, op.params["pool"], op.params["stride"])
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
