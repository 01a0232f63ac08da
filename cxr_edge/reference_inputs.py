"""Deterministic CXR-like reference images for load-time self-checks, the same bytes on every machine.

An artifact's manifest records the FP32 model's answers on these images; wherever the artifact is loaded,
the backend answers them again and the two are compared. That only means something if the inputs are
bit-identical everywhere, so they are drawn with integer arithmetic alone (no floats, no OpenCV, no
NumPy random streams, whose algorithms may change between releases): a chest phantom of ellipses and
bands, class-like opacities, an xorshift noise field and an exact integer box blur. The manifest also
stores their sha256, which the check verifies before comparing anything.
"""

from __future__ import annotations

import hashlib

import numpy as np

GENERATOR = "cxr-edge phantom v1"


def _xorshift_noise(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Integer noise in [-8, 8] from a per-pixel xorshift32 (Marsaglia), exact in uint32 arithmetic."""
    h, w = shape
    state = (np.arange(h * w, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(seed * 97 + 1)) & np.uint64(0xFFFFFFFF)
    state = state.astype(np.uint32)
    for _ in range(3):
        state ^= state << np.uint32(13)
        state ^= state >> np.uint32(17)
        state ^= state << np.uint32(5)
    return ((state >> np.uint32(24)).astype(np.int64) % 17 - 8).reshape(h, w)


def _inside(yy, xx, cy, cx, ry, rx) -> np.ndarray:
    """Integer ellipse test: ((x-cx)/rx)^2 + ((y-cy)/ry)^2 <= 1, without division."""
    ry, rx = max(1, ry), max(1, rx)
    return ((xx - cx) * ry) ** 2 + ((yy - cy) * rx) ** 2 <= (rx * ry) ** 2


def _box_blur(img: np.ndarray, r: int) -> np.ndarray:
    """Exact integer mean over a (2r+1)^2 window, edges clamped."""
    if r < 1:
        return img
    k = 2 * r + 1
    p = np.pad(img, r, mode="edge")
    c = np.cumsum(np.cumsum(p, 0), 1)
    c = np.pad(c, ((1, 0), (1, 0)))
    s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return s // (k * k)


def phantom(h: int, w: int, index: int) -> np.ndarray:
    """One int64 (h, w) image in 0..255: a chest with lungs, ribs and spine; opacities by ``index % 3``."""
    yy = np.arange(h, dtype=np.int64)[:, None]
    xx = np.arange(w, dtype=np.int64)[None, :]
    shift = (index * 7) % 11 - 5  # patients differ in position
    cy, cx = h // 2 + shift * h // 200, w // 2 + shift * w // 150
    img = 30 + (yy * 40) // max(1, h) + np.zeros((h, w), np.int64)
    img = img + 90 * _inside(yy, xx, cy, cx, (h * 46) // 100, (w * 42) // 100)  # the body
    lungs = np.zeros((h, w), bool)
    for side in (-1, 1):
        lungs |= _inside(yy, xx, (h * 45) // 100 + shift, cx + side * (w * 19) // 100, (h * 28) // 100, (w * 13) // 100)
    img = img - 75 * lungs
    ribs = ((yy * 14) // max(1, h) + (xx * 3) // max(1, w) + index) % 2 == 0
    img = img + 22 * (lungs & ribs)
    img = img + 70 * (np.abs(xx - cx) < max(1, (w * 6) // 100))  # spine and mediastinum
    kind = index % 3
    if kind == 0:  # patchy peripheral, lower-zone opacities (COVID-like)
        for k in range(4):
            side = -1 if k % 2 == 0 else 1
            oy = (h * (55 + 8 * (k // 2))) // 100
            ox = cx + side * (w * (24 + 3 * k)) // 100
            img = img + 45 * (lungs & _inside(yy, xx, oy, ox, (h * (6 + k)) // 100, (w * (5 + k)) // 100))
    elif kind == 2:  # one diffuse central region (viral-pneumonia-like)
        img = img + 30 * (lungs & _inside(yy, xx, (h * 50) // 100, cx, (h * 20) // 100, (w * 30) // 100))
    img = _box_blur(img, max(1, min(h, w) // 48))
    img = img + _xorshift_noise((h, w), index)
    return np.clip(img, 0, 255)


def reference_inputs(height: int, width: int, channels: int, n: int = 8) -> np.ndarray:
    """``n`` packed uint8 images (n, height, width, channels), as the engine takes them."""
    imgs = [phantom(height, width, i).astype(np.uint8) for i in range(n)]
    x = np.stack(imgs)[..., None]
    return np.ascontiguousarray(np.repeat(x, channels, axis=3)) if channels > 1 else x


def inputs_sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
