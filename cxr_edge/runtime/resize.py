"""OpenCV's INTER_AREA resize written once against an array module: NumPy on the CPU, CuPy on a GPU.

The batched GPU preprocessing path resizes decoded images on the device, so the model must see there what
``cv2.resize(..., INTER_AREA)`` gives it on the CPU path, training included. Reproduced from OpenCV's
rules, verified against ``cv2.resize`` by property tests (tests/test_resize.py), and run with CuPy by the
GPU kit (tests/gpu):

* integer factors (``resizeAreaFast``): box sums in integers; 2x2 rounds half up ((s + 2) >> 2, OpenCV's
  vector path), every other factor rounds ``sum * float32(1 / area)`` to nearest even: bit-exact;
* other downscales (``resizeArea``): OpenCV's area weight tables applied as two float32 matrix products,
  then rint: within one grey level (OpenCV accumulates in another order);
* upscales (either axis growing): OpenCV's INTER_AREA enlarging rule on both axes (bilinear with its own
  fractional offsets), float32, rint; OpenCV computes this one in 11-bit fixed point, hence one grey level.

Input ``(H, W)`` or ``(H, W, C)`` uint8 or uint16; output the same dtype. ``xp`` is ``numpy`` or ``cupy``.
"""

from __future__ import annotations

import math

import numpy as np


def _area_table(src: int, dst: int) -> np.ndarray:
    """(dst, src) float32 weights of OpenCV's computeResizeAreaTab for one axis (a downscale)."""
    scale = 1.0 / (dst / src)  # as OpenCV computes it (1 / inv_scale): src / dst rounds differently
    w = np.zeros((dst, src), np.float64)
    for dx in range(dst):
        fsx1 = dx * scale
        fsx2 = fsx1 + scale
        cell = min(scale, src - fsx1)
        sx1, sx2 = math.ceil(fsx1), math.floor(fsx2)
        sx2 = min(sx2, src - 1)
        sx1 = min(sx1, sx2)
        if sx1 - fsx1 > 1e-3:
            w[dx, sx1 - 1] = (sx1 - fsx1) / cell
        for sx in range(sx1, sx2):
            w[dx, sx] = 1.0 / cell
        if fsx2 - sx2 > 1e-3:
            w[dx, sx2] = min(min(fsx2 - sx2, 1.0), cell) / cell
    return w.astype(np.float32)


def _upscale_table(src: int, dst: int) -> np.ndarray:
    """(dst, src) float32 weights of OpenCV's INTER_AREA rule when enlarging (linear with its own offsets)."""
    inv = dst / src  # OpenCV's inv_scale, and its scale = 1 / inv_scale, in double
    scale = 1.0 / inv
    w = np.zeros((dst, src), np.float64)
    for dx in range(dst):
        sx = math.floor(dx * scale)
        fx = float(np.float32((dx + 1) - (sx + 1) * inv))
        fx = 0.0 if fx <= 0 else float(np.float32(fx - math.floor(fx)))
        if sx < 0:
            fx, sx = 0.0, 0
        if sx >= src - 1:
            fx, sx = 0.0, src - 1
        w[dx, sx] += 1.0 - fx
        if fx:
            w[dx, sx + 1] += fx
    return w.astype(np.float32)




def area_resize(img, height: int, width: int, xp=np):
    """``cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)`` with array module ``xp``."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img.copy()
    dtype = img.dtype
    top = 255 if dtype == xp.uint8 else 65535
    if h % height == 0 and w % width == 0:  # resizeAreaFast: integer box sums
        fy, fx = h // height, w // width
        s = img.reshape(height, fy, width, fx, *img.shape[2:]).astype(xp.int64).sum(axis=(1, 3))
        if (fy, fx) == (2, 2):
            return ((s + 2) >> 2).astype(dtype)
        return xp.rint(s.astype(xp.float32) * xp.float32(1.0 / (fy * fx))).astype(dtype)
    # OpenCV averages areas only when neither axis grows; otherwise both axes use its enlarging rule
    table = _area_table if height <= h and width <= w else _upscale_table
    wy = xp.asarray(table(h, height))
    wx = xp.asarray(table(w, width))
    x = img.astype(xp.float32)
    if x.ndim == 2:
        out = wy @ x @ wx.T
    else:  # (H, W, C): rows, then columns, per channel
        out = xp.einsum("ij,jkc->ikc", wy, x)
        out = xp.einsum("ikc,lk->ilc", out, wx)
    return xp.clip(xp.rint(out), 0, top).astype(dtype)


def gray_to_rgb(img, xp=np):
    """(H, W) or (H, W, 1) -> (H, W, 3), replicated (what the fused graph's first layer expects for RGB input)."""
    g = img[..., 0] if img.ndim == 3 else img
    return xp.repeat(g[..., None], 3, axis=2)
