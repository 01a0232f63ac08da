"""Preprocessing throughput by path: images/s and ms per megapixel of the host half of preprocessing
(decoded pixels -> model input), on the CPU (OpenCV, what runs today), with the array-module resize on
NumPy (the GPU path's reference, for scale), and on the GPU with CuPy ("could not run" without a device).

Decoding is excluded on purpose: it stays on the CPU in both paths, so this isolates what moving the
resize to the device buys; end-to-end rows of ``bench`` include it.
"""

from __future__ import annotations

import time

import numpy as np

from ..preprocess import PreprocessSpec, pack_image


def _images(paths, spec, n: int) -> list[np.ndarray]:
    """Up to ``n`` decoded images at native size (channels and depth converted, not resized)."""
    from ..decode import decode_image
    from ..errors import ImageError

    out = []
    for p in paths:
        try:
            img = decode_image(p, channels=spec.input_channels)
        except ImageError:
            continue
        out.append(pack_image(img.pixels, spec, resize=False))
        if len(out) >= n:
            break
    if not out:  # no files: synthetic radiograph-sized images (2000 x 1600)
        rng = np.random.default_rng(0)
        out = [rng.integers(0, 256, (2000, 1600, spec.input_channels), dtype=np.uint8) for _ in range(4)]
    return out


def _time(fn, images, budget_s: float) -> tuple[float, int]:
    fn(images[0])  # warm-up (first-call kernel compilation on the GPU)
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < budget_s:
        for img in images:
            fn(img)
            n += 1
    return time.perf_counter() - t0, n


def measure_preprocessing(paths, spec: PreprocessSpec, budget_s: float = 1.0, n_images: int = 16) -> list[dict]:
    from ..runtime.resize import area_resize

    images = _images(paths, spec, n_images)
    mp = float(np.mean([im.shape[0] * im.shape[1] for im in images])) / 1e6
    rows = []

    def row(path: str, impl: str, fn) -> dict:
        try:
            dt, n = _time(fn, images, budget_s)
        except Exception as exc:
            return {"path": path, "implementation": impl, "status": f"could not run: {type(exc).__name__}: {exc}"[:200]}
        return {"path": path, "implementation": impl, "status": "ran", "images_per_s": n / dt,
                "ms_per_image": 1e3 * dt / n, "ms_per_megapixel": 1e3 * dt / n / mp, "mean_megapixels": mp}

    rows.append(row("cpu", "OpenCV cv2.resize INTER_AREA (the CPU path)", lambda im: pack_image(im, spec)))
    rows.append(row("cpu", "array-module area_resize on NumPy (the GPU path's reference)",
                    lambda im: area_resize(im, spec.height, spec.width)))
    try:
        import cupy as cp

        from ..runtime.gpu_preprocess import self_test

        why = self_test(cp)
    except ImportError:
        cp, why = None, "CuPy is not installed"
    if cp is None or why:
        rows.append({"path": "gpu", "implementation": "CuPy area_resize", "status": f"could not run: {why or 'no CUDA device'}"})
    else:
        def gpu(im):
            out = area_resize(cp.asarray(im), spec.height, spec.width, cp)
            cp.cuda.get_current_stream().synchronize()
            return out

        rows.append(row("gpu", "CuPy area_resize (host -> device copy included)", gpu))
    return rows
