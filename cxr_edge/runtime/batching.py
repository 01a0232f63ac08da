"""Batched preprocessing that overlaps decoding of batch k+1 with inference of batch k.

Files and bytes are decoded in worker processes under a per-image deadline and memory ceiling
(:mod:`cxr_edge.decode_workers`) unless ``isolation`` is None, then in a thread pool (OpenCV releases
the GIL); NumPy arrays are packed in the caller's process (there is nothing to decode). Packed bytes go
straight into a preallocated uint8 batch. Items that fail become per-item errors and the rest of the
batch is still answered.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import Queue

import numpy as np

from ..decode import DecodeLimits
from ..decode_workers import DecodeIsolation, IsolatedDecoder, preview_of
from ..errors import ImageError
from ..preprocess import PreprocessSpec, pack_source


@dataclass
class PackedBatch:
    x: np.ndarray  # (n_ok, H, W, C) uint8: a view of a preallocated buffer
    indices: list[int]  # positions of the packed items in the caller's sequence
    errors: dict[int, ImageError] = field(default_factory=dict)
    originals: dict[int, np.ndarray] = field(default_factory=dict)  # decoded previews, kept only for explanations
    names: dict[int, str] = field(default_factory=dict)
    decode_s: float = 0.0


def item_name(item, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"array[{i}]"
    return f"item[{i}]"


class BatchPacker:
    resize = True  # the GPU packer decodes here and resizes on the device
    path = "cpu"  # which preprocessing path ran, for results and /metrics

    def __init__(self, spec: PreprocessSpec, batch_size: int, workers: int | None = None,
                 limits: DecodeLimits = DecodeLimits(), keep_originals: bool = False,
                 isolation: DecodeIsolation | None = None, reduce: bool = False):
        self.spec, self.batch_size, self.limits, self.keep = spec, batch_size, limits, keep_originals
        self.reduce = reduce  # reduced-resolution JPEG decoding (the artifact's decode gate passed)
        self.pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1))
        self.isolated = (IsolatedDecoder(spec, limits, isolation, reduce=reduce)
                         if isolation and isolation.workers > 0 else None)
        # three buffers: one being inferred, one queued, one being filled
        self.buffers = [np.empty((batch_size, *spec.input_shape), np.uint8) for _ in range(3)]

    def _one(self, item, i):
        name = item_name(item, i)
        if self.isolated is not None and not isinstance(item, np.ndarray):
            try:
                it = self.isolated.decode(item, None if isinstance(item, (str, os.PathLike)) else name, self.keep,
                                          self.resize)
                return i, name, it.packed, it.preview, None
            except ImageError as exc:
                return i, name, None, None, exc
        try:
            packed, img = pack_source(item, self.spec, name=name if not isinstance(item, (str, os.PathLike)) else None,
                                      limits=self.limits, resize=self.resize, reduce=self.reduce)
            return i, name, packed, (preview_of(img.pixels) if self.keep else None), None
        except ImageError as exc:
            return i, name, None, None, exc
        except Exception as exc:  # a decoder bug must not take down the batch: report it per item
            return i, name, None, None, ImageError(name, f"unexpected {type(exc).__name__}: {exc}")

    def pack(self, items: list, start: int, buf: np.ndarray) -> PackedBatch:
        t0 = time.perf_counter()
        pb = PackedBatch(buf[:0], [])
        n = 0
        for i, name, packed, orig, err in self.pool.map(lambda a: self._one(*a), [(it, start + k) for k, it in enumerate(items)]):
            pb.names[i] = name
            if err is not None:
                pb.errors[i] = err
                continue
            self._place(buf, n, packed)
            pb.indices.append(i)
            if orig is not None:
                pb.originals[i] = orig
            n += 1
        pb.x = buf[:n]
        self._finish(pb)
        pb.decode_s = time.perf_counter() - t0
        return pb

    def _place(self, buf, n: int, packed: np.ndarray) -> None:
        """Put one packed image in slot ``n`` of the batch (the GPU packer resizes into a device batch here)."""
        buf[n] = packed

    def _finish(self, pb: PackedBatch) -> None:
        """The batch is complete (the GPU packer waits for its device work here)."""

    def iter_batches(self, items):
        """Yield PackedBatch objects; batch k+1 is decoded in the background while k is consumed."""
        items = list(items)
        q: Queue = Queue(maxsize=1)
        stop = threading.Event()

        def producer():
            try:
                for k, start in enumerate(range(0, len(items), self.batch_size)):
                    if stop.is_set():
                        break
                    q.put(self.pack(items[start : start + self.batch_size], start, self.buffers[k % 3]))
            except BaseException as exc:  # surfaced in the consumer
                q.put(exc)
            q.put(None)

        t = threading.Thread(target=producer, daemon=True)
        t.start()
        try:
            while (pb := q.get()) is not None:
                if isinstance(pb, BaseException):
                    raise pb
                yield pb
        finally:
            stop.set()
            while t.is_alive():  # drain so the producer can finish
                if q.get() is None:
                    break
            t.join()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.isolated is not None:
            self.isolated.close()

