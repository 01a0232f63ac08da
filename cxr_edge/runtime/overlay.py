"""Heatmap overlays for the radiologist: PNG over the radiograph, and the raw map as .npy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .gradcam import normalise


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4, scale: float | None = None) -> np.ndarray:
    """BGR uint8 image of ``cam`` (JET colour map) blended over ``image`` (gray or BGR, any size)."""
    import cv2

    from ..preprocess import to_uint8

    base = to_uint8(image)
    if base.ndim == 2 or base.shape[2] == 1:
        base = cv2.cvtColor(base.reshape(base.shape[:2]), cv2.COLOR_GRAY2BGR)
    elif base.shape[2] == 4:
        base = cv2.cvtColor(base, cv2.COLOR_BGRA2BGR)
    h, w = base.shape[:2]
    m = normalise(cam, scale)
    m = cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)
    # weight the colour by the map itself, so cold regions leave the radiograph readable
    a = (alpha * m)[:, :, None]
    return (base * (1 - a) + heat * a).astype(np.uint8)


def save_explanation(out_dir: str | Path, stem: str, image: np.ndarray, cam: np.ndarray,
                     scale: float | None = None) -> dict[str, str]:
    import cv2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, npy = out / f"{stem}.gradcam.png", out / f"{stem}.gradcam.npy"
    cv2.imwrite(str(png), overlay(image, cam, scale=scale))
    np.save(npy, cam.astype(np.float32), allow_pickle=False)
    return {"overlay": str(png), "raw": str(npy)}
