"""Decode and pack many images in parallel, skipping (and reporting) the ones that fail.

OpenCV releases the GIL while decoding and resizing, so a thread pool scales across cores
without the pickling cost of processes.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..decode import DecodeLimits
from ..errors import ImageError
from ..preprocess import PreprocessSpec, pack_source

log = logging.getLogger(__name__)


@dataclass
class LoadedImages:
    x: np.ndarray  # uint8 (N, H, W, C_in), packed per the spec
    kept: list[int]  # indices into the requested sources that decoded
    original_sizes: list[tuple[int, int]]  # (height, width) as stored, for the size-confounder probe
    errors: list[ImageError] = field(default_factory=list)


def _load_one(source, spec: PreprocessSpec, limits: DecodeLimits, common_size: int | None):
    packed, img = pack_source(source, spec, limits=limits, common_size=common_size)
    return packed, img.shape


def load_images(
    sources,
    spec: PreprocessSpec,
    *,
    workers: int | None = None,
    limits: DecodeLimits = DecodeLimits(),
    common_size: int | None = None,
    progress: bool = False,
) -> LoadedImages:
    """Pack every decodable source; bad ones are logged and returned in ``errors``, never raised."""
    sources = list(sources)
    x = np.empty((len(sources), *spec.input_shape), dtype=np.uint8)
    kept: list[int] = []
    sizes: list[tuple[int, int]] = []
    errors: list[ImageError] = []
    workers = workers or min(8, os.cpu_count() or 1)

    def job(i):
        try:
            return i, _load_one(sources[i], spec, limits, common_size), None
        except ImageError as exc:
            return i, None, exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(job, range(len(sources)))
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(sources), desc="decode", unit="img")
        for i, out, err in results:
            if err is not None:
                log.warning("skipping %s", err)
                errors.append(err)
                continue
            x[len(kept)] = out[0]
            kept.append(i)
            sizes.append(out[1])
    return LoadedImages(x[: len(kept)], kept, sizes, errors)
