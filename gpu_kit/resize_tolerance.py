"""How far a device resize may differ from the NumPy reference, measured on a CPU by summing in other orders.

The device computes the same float32 products as NumPy but may add them in another order (cuBLAS blocking,
tensor-core accumulation, another contraction path), so a pixel whose exact value sits near a .5 rounding
boundary may land one grey level away. How many such pixels a case has depends on its values (uint16 data has
256x as many boundaries per unit of float error as uint8), so a single "99.9% exact" threshold was too tight for
uint16 (other orders gave 99.79-99.92%). This script recomputes every case of ``tests/gpu/test_resize_gpu.py``
under several summation orders and writes, per case, the worst share of pixels that moved and the largest
move; the GPU test allows ``max(0.1%, 3x)`` that share and at most one level.

    python gpu_kit/resize_tolerance.py     # writes tests/gpu/fixtures/resize_tolerance.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "gpu" / "fixtures" / "resize_tolerance.json"
# the cases of tests/gpu/test_resize_gpu.py::test_cupy_resize_equals_the_numpy_reference
SHAPES = [((2048, 1664), (224, 224)), ((3000, 2500), (128, 128)), ((512, 512), (256, 256)),
          ((300, 200, 3), (224, 224)), ((97, 131), (64, 40)), ((100, 80), (300, 240))]
DTYPES = {"uint8": np.uint8, "uint16": np.uint16}


def case_key(shape, out, dtype_name: str) -> str:
    return f"{'x'.join(map(str, shape))}->{'x'.join(map(str, out))}:{dtype_name}"


def case_input(shape, dtype) -> np.ndarray:
    """The test's input, regenerated identically (same seed rule)."""
    rng = np.random.default_rng(sum(shape))
    return rng.integers(0, 256 if dtype == np.uint8 else 65536, shape, dtype=dtype)


def _orders(img: np.ndarray, height: int, width: int):
    """The separable weighted sum of ``area_resize`` computed in other float32 orders (None when the case takes
    the integer box-sum path, which has no float order to vary)."""
    from cxr_edge.runtime import resize as R

    h, w = img.shape[:2]
    if h % height == 0 and w % width == 0:
        return None
    table = R._area_table if height <= h and width <= w else R._upscale_table
    wy, wx = table(h, height), table(w, width)
    x = img.astype(np.float32)
    if x.ndim == 2:
        x = x[..., None]
    rev_y, rev_x = wy[:, ::-1], wx[:, ::-1]

    def passes(first, second):
        return np.stack([second(first(x[..., c])) for c in range(x.shape[2])], axis=-1)

    yield "einsum rows then columns", np.einsum("ikc,lk->ilc", np.einsum("ij,jkc->ikc", wy, x), wx)
    yield "matmul (BLAS blocking)", passes(lambda a: wy @ a, lambda a: a @ wx.T)
    yield "reversed summation", passes(lambda a: rev_y @ a[::-1], lambda a: a[:, ::-1] @ rev_x.T)
    yield "columns then rows", passes(lambda a: a @ wx.T, lambda a: wy @ a)
    yield "exact passes, float32 between", passes(
        lambda a: (wy.astype(np.float64) @ a.astype(np.float64)).astype(np.float32),
        lambda a: (a.astype(np.float64) @ wx.T.astype(np.float64)).astype(np.float32))
    yield "sequential accumulation", passes(lambda a: _sequential(wy, a), lambda a: _sequential(wx, a.T).T)


def _sequential(wt: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``wt @ a`` adding one source row at a time in float32 (a GPU thread's loop)."""
    out = np.zeros((wt.shape[0], a.shape[1]), np.float32)
    for j in range(wt.shape[1]):
        col = wt[:, j]
        nz = np.nonzero(col)[0]
        if nz.size:
            out[nz] += col[nz, None] * a[j][None, :]
    return out


def measure() -> dict:
    from cxr_edge.runtime.resize import area_resize

    result = {}
    for shape, out in SHAPES:
        for name, dtype in DTYPES.items():
            img = case_input(shape, dtype)
            ref = area_resize(img, *out).astype(np.int64)
            top = 255 if dtype == np.uint8 else 65535
            worst_share, worst_step, orders = 0.0, 0, {}
            for label, val in _orders(img, *out) or []:
                got = np.clip(np.rint(val), 0, top).astype(np.int64).reshape(ref.shape)
                d = np.abs(got - ref)
                share = float((d != 0).mean())
                orders[label] = {"moved_share": share, "max_step": int(d.max())}
                worst_share, worst_step = max(worst_share, share), max(worst_step, int(d.max()))
            result[case_key(shape, out, name)] = {"worst_moved_share": worst_share, "worst_step": worst_step,
                                                  "orders": orders}
    return result


def main() -> None:
    res = measure()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"command": "python gpu_kit/resize_tolerance.py", "cases": res}, indent=1) + "\n")
    for k, v in res.items():
        print(f"{k:32s} worst share moved {100 * v['worst_moved_share']:.3f}%  max step {v['worst_step']}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
