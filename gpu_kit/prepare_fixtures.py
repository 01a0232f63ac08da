"""Reference results computed on a CPU machine (cv2 INTER_AREA), for tests/gpu to compare the device with.

    python gpu_kit/prepare_fixtures.py        # writes tests/gpu/fixtures/resize_cases.npz (a few hundred kB)
"""

from pathlib import Path

import cv2
import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "gpu" / "fixtures" / "resize_cases.npz"
CASES = [((512, 416), (224, 224)), ((640, 512), (128, 128)), ((333, 257), (224, 224)), ((300, 300), (150, 150)),
         ((97, 131), (64, 40)), ((100, 80), (300, 240)), ((256, 256, 3), (224, 224))]


def case_input(k: int) -> np.ndarray:
    """Input k, regenerated identically on any machine (NumPy's PCG64 stream is stable): only the cv2
    outputs are stored."""
    shape = CASES[k][0]
    return np.random.default_rng(2026 + k).integers(0, 256, shape, dtype=np.uint8)


def main() -> None:
    arrays = {}
    for k, (_, (h, w)) in enumerate(CASES):
        arrays[f"cv2_{k}"] = cv2.resize(case_input(k), (w, h), interpolation=cv2.INTER_AREA)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} kB, {len(CASES)} cases)")


if __name__ == "__main__":
    main()
