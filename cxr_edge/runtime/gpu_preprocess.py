"""Batched preprocessing on the GPU: CPU threads decode, the device resizes into the engine's batch.

On a GPU server or a Jetson the CPU is the bottleneck of screening (decoding and resizing a radiograph on a
few cores takes longer than TensorRT's inference of it). The GPU packer keeps the
decoding, and every size and bomb check, on the CPU (threads or the isolated workers, unchanged), then
uploads each decoded image through pinned staging memory and resizes it on the device with the same rule
as the CPU path (:func:`.resize.area_resize`, checked against cv2 and, by the GPU kit, CuPy against NumPy)
straight into a preallocated device batch. Per-item errors are those of the CPU path. ``xp`` is CuPy on a
GPU; the CPU tests run the same code with NumPy and with a CuPy-shaped fake built from the recorded API of
the real CuPy releases (tests/fake_cupy.py, tests/test_cupy_api.py).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..decode import DecodeLimits
from ..extras import require
from ..preprocess import PreprocessSpec
from .batching import BatchPacker, PackedBatch
from .resize import area_resize

log = logging.getLogger(__name__)


def self_test(xp) -> str | None:
    """None when ``xp`` resizes like the CPU path here (a random 8-bit image, an integer and a fractional
    factor); else why not. ``auto`` uses the GPU only after this passes at load."""
    try:
        rng = np.random.default_rng(0)
        img = rng.integers(0, 256, (96, 80), dtype=np.uint8)
        for h, w in ((48, 40), (33, 29)):
            ref = area_resize(img, h, w)
            got = xp.asnumpy(area_resize(xp.asarray(img), h, w, xp)) if hasattr(xp, "asnumpy") else \
                area_resize(xp.asarray(img), h, w, xp)
            if got.shape != ref.shape or int(np.abs(got.astype(int) - ref.astype(int)).max()) > 0:
                return f"device resize differs from the CPU reference at {h}x{w}"
    except Exception as exc:  # no device, no driver, no kernel compiler
        return f"{type(exc).__name__}: {exc}"
    return None


class GpuBatchPacker(BatchPacker):
    """:class:`~.batching.BatchPacker`'s contract (PackedBatch per batch, per-item errors, decoding of batch
    k+1 overlapped with inference of batch k), with ``x`` a device array of the resized batch."""

    resize = False
    path = "gpu"

    def __init__(self, spec: PreprocessSpec, batch_size: int, workers: int | None = None,
                 limits: DecodeLimits = DecodeLimits(), keep_originals: bool = False, isolation=None, xp=None,
                 reduce: bool = False):
        super().__init__(spec, batch_size, workers, limits, keep_originals, isolation, reduce=reduce)
        # ``xp`` is NumPy or CuPy (names used through it exist in both); ``cp`` is CuPy only (tests/test_cupy_api.py
        # checks every use against the recorded API of each supported CuPy release, calling form included)
        self.xp = xp if xp is not None else require("cupy")
        self.on_device = hasattr(self.xp, "cuda")
        # three device batches (one inferred, one queued, one filled), fixed addresses for the whole run
        self.buffers = [self.xp.empty((batch_size, *spec.input_shape), self.xp.uint8) for _ in range(3)]
        self.stream: Any | None = None  # a cupy.cuda.Stream on a device (CuPy ships no type information)
        if self.on_device:
            cp = self.xp
            self.stream = cp.cuda.Stream(non_blocking=True)
        self._pinned: Any | None = None  # a cupy.cuda.PinnedMemoryPointer, made for the first staged image

    def _stage(self, packed: np.ndarray):
        """Host image -> device, through a reused pinned buffer (grown as needed) on the packer's stream."""
        if not self.on_device:
            return self.xp.asarray(packed)
        cp = self.xp
        assert self.stream is not None  # made in __init__ whenever on_device
        nbytes = packed.nbytes
        # PinnedMemoryPointer.size is a method in CuPy 13 and 14 (size(self) -> size_t): compared uncalled it
        # raises TypeError on the second image, and the Screener falls back to the CPU path
        if self._pinned is None or self._pinned.size() < nbytes:
            self._pinned = cp.cuda.alloc_pinned_memory(nbytes)  # at least nbytes: a pooled block may be larger
        host = np.frombuffer(self._pinned, np.uint8, nbytes).reshape(packed.shape)
        host[...] = packed
        with self.stream:  # allocated in the stream's pool arena: freed only behind the resize that reads it
            dev = cp.empty(packed.shape, cp.uint8)
        dev.set(host, stream=self.stream)
        self.stream.synchronize()  # the pinned buffer is reused by the next image
        return dev

    def _place(self, buf, n: int, packed: np.ndarray) -> None:
        dev = self._stage(packed)
        if self.on_device:
            assert self.stream is not None  # made in __init__ whenever on_device
            with self.stream:
                buf[n] = area_resize(dev, self.spec.height, self.spec.width, self.xp)
        else:
            buf[n] = area_resize(dev, self.spec.height, self.spec.width, self.xp)

    def _finish(self, pb: PackedBatch) -> None:
        if self.on_device:
            assert self.stream is not None  # made in __init__ whenever on_device
            self.stream.synchronize()  # the batch is complete before an engine on another stream reads it


def to_host(x) -> np.ndarray:
    """A device batch as a host array (for engines that take host memory only)."""
    return x.get() if hasattr(x, "get") else np.asarray(x)
