"""The classifier head after the last convolution, as plain NumPy arrays.

Export stores the head (pooling, flatten, dense, batch-norm, dropout) beside each ONNX artifact as an
``.npz`` plus a JSON op list in the manifest, so the runtime can recompute the head from the exported
feature map without TensorFlow: to check it (export verifies head(features) == probs) and, for
Grad-CAM, to differentiate it in closed form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import ManifestError
from ..manifest_schema import ArtifactManifest, HeadOpSpec


class HeadOp:
    """One layer of the head: its forward pass and, beside it, its exact gradient (for Grad-CAM).

    Forward and backward live in one class so they cannot drift apart; a new layer kind is one new
    subclass here, and the exporter (``export/head_export.py``) learns to emit it.
    """

    kind: ClassVar[str] = ""

    def __init__(self, params: dict | None = None, arrays: dict[str, np.ndarray] | None = None):
        self.params = dict(params or {})
        self.arrays = dict(arrays or {})

    def forward(self, x: np.ndarray, last: bool = False, logits: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(output, dense pre-activation or None)."""
        raise NotImplementedError

    def backward(self, grad: np.ndarray, inp: np.ndarray, pre: np.ndarray | None, out: np.ndarray,
                 last: bool) -> np.ndarray:
        """d score / d input, given d score / d output (``grad``) and what forward saw and produced."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


class MaxPool(HeadOp):
    kind = "maxpool"

    def _windows(self, x: np.ndarray):
        pool, stride = self.params["pool"], self.params["stride"]
        oh, ow = (x.shape[1] - pool) // stride + 1, (x.shape[2] - pool) // stride + 1
        for dy in range(pool):
            for dx in range(pool):
                yield (slice(None), slice(dy, dy + stride * oh, stride), slice(dx, dx + stride * ow, stride)), (oh, ow)

    def forward(self, x, last=False, logits=False):
        out = None
        for idx, (oh, ow) in self._windows(x):
            if out is None:
                out = np.full((len(x), oh, ow, x.shape[3]), -np.inf, dtype=x.dtype)
            out = np.maximum(out, x[idx])
        return out, None

    def backward(self, grad, inp, pre, out, last):
        """Route each window's gradient to its (first) maximum, as TensorFlow's MaxPoolGrad does."""
        g = np.zeros_like(inp)
        taken = np.zeros(out.shape, bool)
        for idx, _ in self._windows(inp):
            hit = (inp[idx] == out) & ~taken
            taken |= hit
            g[idx] += np.where(hit, grad, 0)
        return g


class GlobalAveragePool(HeadOp):
    kind = "gap"

    def forward(self, x, last=False, logits=False):
        return x.mean(axis=(1, 2)), None

    def backward(self, grad, inp, pre, out, last):
        h, w = inp.shape[1:3]
        return np.broadcast_to(grad[:, None, None, :] / (h * w), inp.shape).copy()


class GlobalMaxPool(HeadOp):
    kind = "gmp"

    def forward(self, x, last=False, logits=False):
        return x.max(axis=(1, 2)), None

    def backward(self, grad, inp, pre, out, last):
        mask = inp == inp.max(axis=(1, 2), keepdims=True)
        first = mask & (np.cumsum(np.cumsum(mask, 1), 2) == 1)
        return np.where(first, grad[:, None, None, :], 0.0)


class Flatten(HeadOp):
    kind = "flatten"

    def forward(self, x, last=False, logits=False):
        return x.reshape(len(x), -1), None

    def backward(self, grad, inp, pre, out, last):
        return grad.reshape(inp.shape)


class Dense(HeadOp):
    kind = "dense"

    def forward(self, x, last=False, logits=False):
        pre = x @ self.arrays["kernel"] + self.arrays.get("bias", 0.0)
        return (pre if (last and logits) else _activation(pre, self.params.get("activation", "linear"))), pre

    def backward(self, grad, inp, pre, out, last):
        # the last dense layer is differentiated before its softmax (Grad-CAM explains the class score)
        if not last and self.params.get("activation") == "relu":
            grad = grad * (pre > 0)
        return grad @ self.arrays["kernel"].T


class BatchNorm(HeadOp):
    kind = "batchnorm"

    def forward(self, x, last=False, logits=False):
        return x * self.arrays["scale"] + self.arrays["shift"], None

    def backward(self, grad, inp, pre, out, last):
        return grad * self.arrays["scale"]


class Relu(HeadOp):
    kind = "relu"

    def forward(self, x, last=False, logits=False):
        return np.maximum(x, 0), None

    def backward(self, grad, inp, pre, out, last):
        return grad * (inp > 0)


class Identity(HeadOp):
    """Dropout and other layers that do nothing at inference."""

    kind = "identity"

    def forward(self, x, last=False, logits=False):
        return x, None

    def backward(self, grad, inp, pre, out, last):
        return grad


OPS: dict[str, type[HeadOp]] = {c.kind: c for c in (MaxPool, GlobalAveragePool, GlobalMaxPool, Flatten, Dense,
                                                    BatchNorm, Relu, Identity)}
SUPPORTED_OPS = tuple(OPS)


def load_head(ops_json: Sequence[HeadOpSpec | Mapping[str, Any]], npz_path: str | Path,
              sha256: str | None = None) -> list[HeadOp]:
    """The head's ops (from the manifest, or as the exporter lists them) with their arrays; with ``sha256`` the file
    must match it (as the manifest says).

    The file is read once and the bytes hashed are the bytes parsed (never the path again after the check)."""
    import hashlib
    import io

    data = Path(npz_path).read_bytes()
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ManifestError(
                f"{Path(npz_path).name} does not match the sha256 in its artifact's manifest "
                f"({actual[:16]}... vs {sha256[:16]}...): the Grad-CAM head was modified or replaced; re-export."
            )
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    out = []
    for i, raw in enumerate(ops_json):
        op = raw if isinstance(raw, HeadOpSpec) else HeadOpSpec.from_dict(raw, f"head_ops[{i}]")
        if op.kind not in OPS:
            raise ManifestError(f"Head op {i} has unsupported kind {op.kind!r}; this cxr-edge knows {list(OPS)}.")
        mine = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{i}/")}
        out.append(OPS[op.kind](dict(op.params), mine))
    return out


def load_artifact_head(artifact: str | Path, manifest: ArtifactManifest) -> list[HeadOp] | None:
    """The verified head stored beside an exported artifact, or None when it has none.

    The file name comes from the manifest, so it must be a bare name in the artifact's folder (no
    path parts) and match the manifest's sha256, which a signed manifest in turn authenticates.
    """
    g = manifest.gradcam
    if g is None or not g.engine_native or not g.head_file:
        return None
    if not g.head_sha256:
        raise ManifestError(f"Manifest of {Path(artifact).name} names a Grad-CAM head but no head_sha256; re-export.")
    from ..manifest import sibling_file

    # a regular file in the artifact's folder: a FIFO or a link to /dev/zero hung predict and serve start-up
    return load_head(g.head_ops, sibling_file(artifact, g.head_file, "Grad-CAM head file"), g.head_sha256)


def _activation(x: np.ndarray, name: str) -> np.ndarray:
    if name in ("linear", None):
        return x
    if name == "relu":
        return np.maximum(x, 0)
    if name == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    raise ManifestError(f"Unsupported head activation {name!r}.")


def forward(ops: list[HeadOp], features: np.ndarray, logits: bool = False) -> np.ndarray:
    """Probabilities (or, with ``logits``, the last dense layer's pre-softmax scores)."""
    x = features.astype(np.float32, copy=False)
    for k, op in enumerate(ops):
        x, _ = op.forward(x, k == len(ops) - 1, logits)
    return x
