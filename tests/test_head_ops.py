"""Each Grad-CAM head op's backward pass is the gradient of its forward pass (finite differences), no TensorFlow."""

import numpy as np
import pytest

from cxr_edge.runtime import head as H
from cxr_edge.runtime.gradcam import head_gradient


def _numeric_grad(f, x, eps=1e-3):
    g = np.zeros_like(x, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


def _op(kind, rng, c=3):
    arrays = {}
    if kind == "dense":
        arrays = {"kernel": rng.normal(size=(c, 2)), "bias": rng.normal(size=2)}
    if kind == "batchnorm":
        arrays = {"scale": rng.uniform(0.5, 2, c), "shift": rng.normal(size=c)}
    params = {"pool": 2, "stride": 2} if kind == "maxpool" else ({"activation": "relu"} if kind == "dense" else {})
    return H.OPS[kind](params, arrays)


@pytest.mark.parametrize("kind", sorted(H.OPS))
def test_backward_is_the_gradient_of_forward(kind):
    rng = np.random.default_rng(0)
    op = _op(kind, rng)
    x = rng.normal(size=(1, 4, 4, 3)) if kind in ("maxpool", "gap", "gmp", "flatten") else rng.normal(size=(1, 3))
    if kind == "relu":
        x[np.abs(x) < 0.05] = 0.3  # keep away from the kink, where the derivative is undefined
    out, pre = op.forward(x)
    w = rng.normal(size=out.shape)  # a random linear read-out of the output: d(w.out)/dx
    analytic = op.backward(w, x, pre, out, last=False)
    numeric = _numeric_grad(lambda z: float((op.forward(z)[0] * w).sum()), x)
    assert analytic.shape == x.shape
    assert np.allclose(analytic, numeric, atol=1e-4), kind


def test_every_kind_the_exporter_writes_has_a_class():
    import re
    from pathlib import Path

    src = (Path(H.__file__).parents[1] / "export" / "head_export.py").read_text()
    written = set(re.findall(r'"kind": "([a-z]+)"', src))
    assert written and written <= set(H.OPS)


def test_head_gradient_through_a_whole_head_matches_finite_differences():
    rng = np.random.default_rng(1)
    ops = [_op("maxpool", rng, 4), _op("flatten", rng), H.Dense({"activation": "relu"},
                                                                 {"kernel": rng.normal(size=(16, 5)), "bias": rng.normal(size=5)}),
           H.Dense({"activation": "softmax"}, {"kernel": rng.normal(size=(5, 2)), "bias": np.zeros(2)})]
    # values 0.1 apart, so a finite-difference step never changes which element wins a max-pool window
    feats = (rng.permutation(64).reshape(1, 4, 4, 4) * 0.1 - 3.2).astype(np.float32)
    grad, target, score = head_gradient(ops, feats, target=1)

    def logit(z):
        return float(H.forward(ops, z.astype(np.float32), logits=True)[0, 1])

    assert score[0] == pytest.approx(logit(feats), abs=1e-5)
    assert np.allclose(grad, _numeric_grad(logit, feats.astype(np.float64), eps=1e-2), atol=2e-2)
