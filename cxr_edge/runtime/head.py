"""The classifier head after the last convolution, as plain NumPy arrays.

Export stores the head (pooling, flatten, dense, batch-norm, dropout) beside each ONNX artifact as an
``.npz`` plus a JSON op list in the manifest, so the runtime can recompute the head from the exported
feature map without TensorFlow: to check it (export verifies head(features) == probs) and, for
Grad-CAM, to differentiate it in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ManifestError

SUPPORTED_OPS = ("maxpool", "gap", "gmp", "flatten", "dense", "batchnorm", "identity", "relu")


@dataclass
class HeadOp:
    kind: str
    params: dict
    arrays: dict[str, np.ndarray]


def load_head(ops_json: list[dict], npz_path: str | Path, sha256: str | None = None) -> list[HeadOp]:
    """The head's ops with their arrays; with ``sha256`` the file must match it (as the manifest says)."""
    if sha256 is not None:
        from ..manifest import sha256_file

        actual = sha256_file(npz_path)
        if actual != sha256:
            raise ManifestError(
                f"{Path(npz_path).name} does not match the sha256 in its artifact's manifest "
                f"({actual[:16]}... vs {sha256[:16]}...): the Grad-CAM head was modified or replaced; re-export."
            )
    with np.load(npz_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    out = []
    for i, op in enumerate(ops_json):
        if op["kind"] not in SUPPORTED_OPS:
            raise ManifestError(f"Head op {i} has unsupported kind {op['kind']!r}.")
        mine = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{i}/")}
        out.append(HeadOp(op["kind"], op.get("params", {}), mine))
    return out


def load_artifact_head(artifact: str | Path, manifest: dict) -> list[HeadOp] | None:
    """The verified head stored beside an exported artifact, or None when it has none.

    The file name comes from the manifest, so it must be a bare name in the artifact's folder (no
    path parts) and match the manifest's sha256, which a signed manifest in turn authenticates.
    """
    g = manifest.get("gradcam") or {}
    name = g.get("head_file")
    if not g.get("engine_native") or not name:
        return None
    if Path(name).name != name or name in (".", ".."):
        raise ManifestError(f"Manifest head_file {name!r} must be a file name beside the artifact, not a path.")
    if not g.get("head_sha256"):
        raise ManifestError(f"Manifest of {Path(artifact).name} names a Grad-CAM head but no head_sha256; re-export.")
    return load_head(g["head_ops"], Path(artifact).parent / name, g["head_sha256"])


def _activation(x: np.ndarray, name: str) -> np.ndarray:
    if name in ("linear", None):
        return x
    if name == "relu":
        return np.maximum(x, 0)
    if name == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    raise ManifestError(f"Unsupported head activation {name!r}.")


def _maxpool(x: np.ndarray, pool: int, stride: int) -> np.ndarray:
    n, h, w, c = x.shape
    oh, ow = (h - pool) // stride + 1, (w - pool) // stride + 1
    out = np.full((n, oh, ow, c), -np.inf, dtype=x.dtype)
    for dy in range(pool):
        for dx in range(pool):
            out = np.maximum(out, x[:, dy : dy + stride * oh : stride, dx : dx + stride * ow : stride, :])
    return out


def apply_op(op: HeadOp, x: np.ndarray, last: bool = False, logits: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """One head op forward: (output, dense pre-activation or None). Shared by inference and Grad-CAM."""
    pre = None
    if op.kind == "maxpool":
        x = _maxpool(x, op.params["pool"], op.params["stride"])
    elif op.kind == "gap":
        x = x.mean(axis=(1, 2))
    elif op.kind == "gmp":
        x = x.max(axis=(1, 2))
    elif op.kind == "flatten":
        x = x.reshape(len(x), -1)
    elif op.kind == "dense":
        pre = x @ op.arrays["kernel"] + op.arrays.get("bias", 0.0)
        x = pre if (last and logits) else _activation(pre, op.params.get("activation", "linear"))
    elif op.kind == "batchnorm":
        x = x * op.arrays["scale"] + op.arrays["shift"]
    elif op.kind == "relu":
        x = np.maximum(x, 0)
    return x, pre


def forward(ops: list[HeadOp], features: np.ndarray, logits: bool = False) -> np.ndarray:
    """Probabilities (or, with ``logits``, the last dense layer's pre-softmax scores)."""
    x = features.astype(np.float32, copy=False)
    for k, op in enumerate(ops):
        x, _ = apply_op(op, x, k == len(ops) - 1, logits)
    return x
