"""A synthetic CXR-like image generator so the demo and tests run anywhere, with no real data.

The anatomy is crude but radiograph-like: a soft-tissue torso, two dark lung fields, a bright spine
and mediastinum, rib arcs and noise. Classes differ by where opacities are drawn, loosely following
the radiology literature: COVID-19 as bilateral, peripheral, lower-zone ground glass; viral
pneumonia as perihilar interstitial streaks; Normal as clear lungs. Image size and bit depth are
drawn independently of class, so unlike the public datasets they cannot leak the label.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from .classes import CANONICAL_CLASSES, COVID, NORMAL, VIRAL_PNEUMONIA
from .errors import ConfigError
from .preprocess import PreprocessSpec, pack_image

SYNTHETIC_CLASSES = (COVID, NORMAL, VIRAL_PNEUMONIA)


def _blob(canvas: np.ndarray, cx: float, cy: float, rx: float, ry: float, amp: float) -> None:
    h, w = canvas.shape
    yy, xx = np.ogrid[:h, :w]
    canvas += amp * np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))


def synth_cxr(label: str, size: int = 256, rng: np.random.Generator | None = None) -> np.ndarray:
    """One synthetic radiograph as float32 in [0, 1], shape ``(size, size)``."""
    import cv2

    rng = rng or np.random.default_rng()
    s = size
    img: np.ndarray = np.zeros((s, s), np.float32)  # float32 throughout; OpenCV returns it as its MatLike
    jitter = lambda v: v * (1 + rng.uniform(-0.06, 0.06))
    # torso soft tissue
    cv2.ellipse(img, (s // 2, int(s * 0.55)), (int(jitter(s * 0.45)), int(s * 0.5)), 0, 0, 360, 0.55, -1)
    # lungs: dark fields
    lungs: np.ndarray = np.zeros_like(img)
    for side in (-1, 1):
        cx = s / 2 + side * jitter(s * 0.2)
        cv2.ellipse(lungs, (int(cx), int(s * 0.5)), (int(jitter(s * 0.15)), int(jitter(s * 0.3))), side * 8, 0, 360, 1.0, -1)
    lungs = cv2.GaussianBlur(lungs, (0, 0), s * 0.02)
    img -= 0.38 * lungs
    # ribs: bright arcs across each lung
    ribs = np.zeros_like(img)
    for k in range(9):
        y = int(s * (0.25 + 0.065 * k))
        for side in (-1, 1):
            cx = int(s / 2 + side * s * 0.12)
            start, end = (180, 360) if side > 0 else (0, 180)
            cv2.ellipse(ribs, (cx, y), (int(s * 0.2), int(s * 0.06)), 0, start, end, 1.0, max(1, s // 90))
    img += 0.12 * cv2.GaussianBlur(ribs, (0, 0), s * 0.004 + 0.5) * lungs
    # spine, mediastinum, heart
    cv2.rectangle(img, (int(s * 0.47), 0), (int(s * 0.53), s), 0.75, -1)
    _blob(img, s * 0.54, s * 0.62, s * 0.12, s * 0.1, 0.25)
    # findings
    if label == COVID:
        for _ in range(rng.integers(3, 7)):
            side = rng.choice([-1, 1])
            _blob(img, s / 2 + side * s * rng.uniform(0.25, 0.33), s * rng.uniform(0.5, 0.75),
                  s * rng.uniform(0.04, 0.09), s * rng.uniform(0.05, 0.1), rng.uniform(0.15, 0.3))
    elif label == VIRAL_PNEUMONIA:
        streaks = np.zeros_like(img)
        for _ in range(rng.integers(6, 12)):
            side = rng.choice([-1, 1])
            ang = rng.uniform(-0.8, 0.8)
            x0, y0 = s / 2 + side * s * 0.08, s * rng.uniform(0.4, 0.6)
            length = s * rng.uniform(0.1, 0.2)
            x1, y1 = x0 + side * length * math.cos(ang), y0 + length * math.sin(ang)
            cv2.line(streaks, (int(x0), int(y0)), (int(x1), int(y1)), 1.0, max(1, s // 100))
        img += 0.3 * cv2.GaussianBlur(streaks, (0, 0), s * 0.012) * lungs
        _blob(img, s * 0.5, s * 0.5, s * 0.16, s * 0.12, 0.1)
    elif label not in CANONICAL_CLASSES:
        raise ConfigError(f"The synthetic generator has no class {label!r}; choose from {list(SYNTHETIC_CLASSES)}.")
    img += rng.normal(0, 0.025, img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    contrast = rng.uniform(0.85, 1.15)
    return np.clip((img - img.mean()) * contrast + img.mean() + rng.uniform(-0.05, 0.05), 0, 1)


def write_synthetic_dataset(
    out_dir: str | Path,
    per_class: int = 60,
    classes: tuple[str, ...] = SYNTHETIC_CLASSES,
    sizes: tuple[int, ...] = (160, 224, 256, 320),
    bit_depths: tuple[int, ...] = (8, 16),
    seed: int = 0,
) -> Path:
    """Write ``out_dir/<class>/*.png`` plus a ``SOURCES.csv`` naming every image as synthetic."""
    import cv2

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows = []
    for label in classes:
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = int(rng.choice(sizes))
            bits = int(rng.choice(bit_depths))
            img = synth_cxr(label, size, rng)
            if bits == 16:
                arr = (img * 4095).astype(np.uint16)  # 12-bit detector data in a 16-bit PNG
            else:
                arr = (img * 255).astype(np.uint8)
            rel = f"{label}/synth_{label.replace(' ', '_').lower()}_{i:04d}.png"
            cv2.imwrite(str(out / rel), arr)
            rows.append({"relpath": rel, "label": label, "source_repo": "synthetic",
                         "original_label_text": f"synthetic; patientid={label[:3].lower()}{i // 2}",
                         "license_note": "generated by cxr-edge"})
    with open(out / "SOURCES.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def synthetic_parity_images(spec: PreprocessSpec, n: int = 16, seed: int = 123) -> np.ndarray:
    """Packed synthetic images for parity checks (gates, bench) when no real data is at hand."""
    rng = np.random.default_rng(seed)
    imgs = [(synth_cxr(SYNTHETIC_CLASSES[i % 3], max(spec.height, spec.width), rng) * 255).astype(np.uint8)
            for i in range(n)]
    return np.stack([pack_image(im, spec) for im in imgs])
