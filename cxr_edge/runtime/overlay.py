"""Heatmap overlays for the radiologist: PNG over the radiograph, and the raw map as .npy.

A map that shows no localised evidence (:func:`cxr_edge.runtime.gradcam.map_evidence`: near-empty, flat or not
finite) is never painted: its overlay is the plain radiograph in gray with a caption that says so, because a map
divided by its own maximum would otherwise colour the whole chest from noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .gradcam import WEAK_CAM_PEAK, MapEvidence, map_evidence, normalise

__all__ = ["MIN_CAPTIONED_WIDTH", "NO_COLOUR_SCALE", "WEAK_CAM_PEAK", "annotate", "caption_of",
           "explained_overlay", "heatmap", "overlay", "save_explanation"]

MIN_CAPTIONED_WIDTH = 640
#: what the colour bar's place says when nothing was painted
NO_COLOUR_SCALE = "no colour scale: the map is empty or flat, nothing is coloured"


def _gray_bgr(image: np.ndarray) -> np.ndarray:
    """The image as uint8 BGR whose three channels are equal: the radiograph with no colour of its own."""
    import cv2

    from ..preprocess import to_uint8

    base = to_uint8(image)
    if base.ndim == 3 and base.shape[2] == 4:
        base = cv2.cvtColor(base, cv2.COLOR_BGRA2GRAY)
    elif base.ndim == 3 and base.shape[2] == 3:
        base = cv2.cvtColor(base, cv2.COLOR_BGR2GRAY)
    return cv2.cvtColor(base.reshape(base.shape[:2]), cv2.COLOR_GRAY2BGR)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4, scale: float | None = None) -> np.ndarray:
    """BGR uint8 image of ``cam`` (JET colour map) blended over ``image`` (gray or BGR, any size); a map with no
    localised evidence gives the radiograph alone, in gray (see :func:`map_evidence`)."""
    import cv2

    from ..preprocess import to_uint8

    if not map_evidence(cam).localised:
        return _gray_bgr(image)
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


def heatmap(cam: np.ndarray, size: tuple[int, int], scale: float | None = None) -> np.ndarray:
    """The JET-coloured map alone (BGR uint8) at ``size`` (w, h): for viewers that blend it themselves. A map with
    no localised evidence gives black (no colour), so a viewer blending it paints nothing."""
    import cv2

    if not map_evidence(cam).localised:
        return np.zeros((size[1], size[0], 3), np.uint8)
    m = cv2.resize(normalise(cam, scale).astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    return cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)


def caption_of(evidence: MapEvidence) -> str | None:
    """The caption line a map with no localised evidence gets (None for a localised map): the same words everywhere."""
    return None if evidence.localised else f"NO LOCALISED EVIDENCE: {evidence.reason}"


def annotate(img: np.ndarray, lines: list[str], vmax: float, scaled_by: str, colour_scale: bool = True) -> np.ndarray:
    """The overlay with a strip below it: a colour bar from 0 to ``vmax`` and caption lines. Without
    ``colour_scale`` (nothing was painted) the bar's place says so instead of showing a ramp such as 0 ... 0."""
    import textwrap

    import cv2

    h, w = img.shape[:2]
    font, fs = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, min(1.0, w / 900))
    lh = int(28 * fs) + 6
    (cw, _), _ = cv2.getTextSize("n", font, fs, 1)
    lines = [part for line in lines for part in textwrap.wrap(line, max(20, (w - 20) // max(1, cw))) or [""]]
    bar_h = max(12, h // 40)
    strip = np.full((bar_h + lh * (len(lines) + 1) + 12, w, 3), 255, np.uint8)
    y = 6 + bar_h + lh - 6
    if colour_scale:
        ramp = cv2.applyColorMap(np.linspace(0, 255, max(2, w - 20)).astype(np.uint8)[None, :], cv2.COLORMAP_JET)
        strip[6 : 6 + bar_h, 10 : w - 10] = np.repeat(ramp, bar_h, axis=0)
        cv2.putText(strip, "0", (10, y), font, fs, (0, 0, 0), 1, cv2.LINE_AA)
        right = f"{vmax:.2g} ({scaled_by})"
        (tw, _), _ = cv2.getTextSize(right, font, fs, 1)
        cv2.putText(strip, right, (max(10, w - 10 - tw), y), font, fs, (0, 0, 0), 1, cv2.LINE_AA)
    else:
        cv2.putText(strip, NO_COLOUR_SCALE, (10, y), font, fs, (0, 0, 0), 1, cv2.LINE_AA)
    for k, line in enumerate(lines):
        cv2.putText(strip, line, (10, y + lh * (k + 1)), font, fs, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([img, strip])


def explained_overlay(image: np.ndarray, cam: np.ndarray, caption: list[str], scale: float | None = None,
                      blended: np.ndarray | None = None) -> np.ndarray:
    """Overlay + colour bar + caption; says which scale the colours use, or, for a map with no localised evidence,
    that nothing is coloured and why. ``blended``: ``overlay(image, cam, scale=scale)`` when the caller already made
    it (the node's kiosk JPEG)."""
    evidence = map_evidence(cam)
    vmax = scale if scale else evidence.peak
    scaled_by = "fixed scale" if scale else "this map's own maximum"
    lines = list(caption)
    note = caption_of(evidence)
    if note:
        lines.insert(0, note)  # first: read before the decision's details, not after them
    if blended is None or not evidence.localised:  # a map with no evidence is never painted, whoever blended it
        blended = overlay(image, cam, scale=scale)
    img = blended
    if img.shape[1] < MIN_CAPTIONED_WIDTH:  # small images: enlarge so the caption stays legible
        import cv2

        f = MIN_CAPTIONED_WIDTH / img.shape[1]
        img = cv2.resize(img, (MIN_CAPTIONED_WIDTH, round(img.shape[0] * f)), interpolation=cv2.INTER_CUBIC)
    return annotate(img, lines, vmax, scaled_by, colour_scale=evidence.localised)


def save_explanation(out_dir: str | Path, stem: str, image: np.ndarray, cam: np.ndarray,
                     scale: float | None = None, caption: list[str] | None = None) -> dict[str, str]:
    """The captioned overlay PNG and the raw map as measured (.npy), whatever the map shows."""
    import cv2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, npy = out / f"{stem}.gradcam.png", out / f"{stem}.gradcam.npy"
    cv2.imwrite(str(png), explained_overlay(image, cam, caption or [], scale))
    np.save(npy, cam.astype(np.float32), allow_pickle=False)
    return {"overlay": str(png), "raw": str(npy)}
