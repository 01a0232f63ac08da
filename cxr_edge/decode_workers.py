"""Decoding in worker processes, each image under a deadline and a memory ceiling.

Header checks bound what a file *declares*; they cannot bound what a decoder *does* with a crafted file
(libpng inflating gigabytes past the last row, libjpeg re-reading scans, pydicom parsing millions of
elements). In a thread, such a file holds a core and the GIL-free decoder for as long as it likes and can
take the whole server's memory. In a worker process it gets ``seconds`` of wall time and an address-space
limit (``memory_mb`` above the worker's own footprint); a worker that overruns is killed and replaced,
and that one image is answered with a per-item error. Only the packed model input (kilobytes) and, when
asked, a preview capped at ``preview_side`` pixels travel back, so an explanation overlay is never built
at full resolution either.

Pool management (per-task deadlines, killing and replacing workers) is ``pebble``'s; the module imports
nothing heavy at the top so a worker can set its thread and memory limits before NumPy and OpenCV load.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: longest side of the decoded image kept for overlays (the heatmap itself is the model's size)
PREVIEW_SIDE = 1024


@dataclass(frozen=True)
class DecodeIsolation:
    """Per-image limits of isolated decoding. ``workers=0`` decodes in threads of the caller (no limits:
    for trusted data, e.g. training on a curated folder).

    ``inline_max_bytes``: images whose whole decoding cost the header bounds (PNG; sequential JPEG with one
    scan per component; uncompressed BMP) and that declare at most this many decoded bytes are decoded in a
    thread of the caller: their memory is at most a few times that, and their time linear in it (the PNG
    data is inflated to exactly the declared rows, the JPEG is walked to its end marker first). Everything
    else (TIFF, DICOM, progressive JPEG, large images) goes to a worker. 0 sends everything to workers.
    """

    workers: int = 2
    seconds: float = 5.0
    memory_mb: int = 1024
    start_method: str = "spawn"  # never fork a process that holds engine threads
    inline_max_bytes: int = 16 * 1024 * 1024


@dataclass
class PackedItem:
    """One decoded, packed image: the model input and what a result reports about the source."""

    packed: Any  # np.ndarray (H, W, C) uint8
    preview: Any | None  # np.ndarray, longest side <= PREVIEW_SIDE, or None
    shape: tuple[int, int]
    format: str
    bit_depth: int
    notes: list[str]


def _limit_worker(memory_mb: int) -> None:
    """Worker initializer: one thread per library, then an address-space ceiling above what is loaded."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import resource

    import cv2
    import numpy  # noqa: F401  (loaded before the ceiling is measured)

    cv2.setNumThreads(1)
    from . import decode, image_headers, preprocess  # noqa: F401

    try:
        import pydicom  # noqa: F401
        import simplejpeg  # noqa: F401
        import tifffile  # noqa: F401
    except ImportError:
        pass
    with open("/proc/self/status") as f:
        vm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)
    if vm and memory_mb > 0:
        limit = vm + memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def decode_and_pack(source, name: str | None, spec, limits, keep_preview: bool, resize: bool = True,
                    reduce: bool = False) -> tuple:
    """Runs in a worker: decode + pack one image. Returns ``("ok", PackedItem)`` or ``("error", kind, name, reason)``
    (exceptions are returned as values: ImageError's constructor does not survive pickling)."""
    from .errors import ImageError
    from .preprocess import pack_source

    shown = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
    try:
        packed, img = pack_source(source, spec, name=name, limits=limits, resize=resize, reduce=reduce)
        preview = preview_of(img.pixels) if keep_preview else None
        return "ok", PackedItem(packed, preview, img.pixels.shape[:2], img.format, img.bit_depth, img.notes)
    except ImageError as exc:
        return "error", type(exc).__name__, exc.source, exc.reason
    except MemoryError:
        return "error", "ImageTooLargeError", shown, "decoding needed more memory than the per-image budget allows."
    except Exception as exc:  # OpenCV reports allocation failures as cv2.error
        if "memory" in str(exc).lower() or "allocate" in str(exc).lower():
            return "error", "ImageTooLargeError", shown, "decoding needed more memory than the per-image budget allows."
        return "error", "ImageError", shown, f"unexpected {type(exc).__name__}: {exc}"


def preview_of(pixels):
    """The decoded image as uint8, longest side at most PREVIEW_SIDE: what overlays are drawn on."""
    import cv2

    from .preprocess import to_uint8

    h, w = pixels.shape[:2]
    f = PREVIEW_SIDE / max(h, w)
    if f < 1:  # resize the wide data first: to_uint8 then works on the small image
        src = pixels if pixels.dtype in ("uint8", "uint16", "float32") else pixels.astype("float32")
        pixels = cv2.resize(src, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return to_uint8(pixels)


def error_from(kind: str, name: str, reason: str):
    from . import errors

    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ImageError)):
        cls = errors.ImageError
    return cls(name, reason)


#: the routing check reads at most this much of an upload (it runs on the service's event loop)
ROUTING_PREFIX = 64 * 1024
#: bytes an inline image may carry beyond its pixels (headers, small text, Huffman tables)
INLINE_SLACK = 64 * 1024
#: PNG chunks whose payload a decoder inflates besides the image (libpng keeps every text chunk): never inline
_PNG_COMPRESSED_ANCILLARY = {b"zTXt", b"iTXt", b"iCCP"}


def header_bounded(data: bytes, max_bytes: int) -> bool:
    """Whether ``data`` is an image whose decoding the header *proves* cheap enough to decode inline, without the
    worker's memory ceiling and deadline (see :class:`DecodeIsolation`); any doubt answers False (a worker).

    Cheap means: decoded pixels within ``max_bytes``, and a file no larger than those pixels plus
    :data:`INLINE_SLACK` (a real PNG or baseline JPEG is smaller than its pixels, while a small PNG can carry text
    chunks that libpng inflates to gigabytes), and for PNG no compressed ancillary chunk at all.
    Only a bounded prefix (JPEG) or the chunk headers (PNG, at most 4,096) are read, so the check itself is cheap
    on the event loop whatever the upload holds.
    """
    from .decode import _sniff_format
    from .image_headers import jpeg_header

    if max_bytes <= 0 or len(data) < 33:
        return False
    try:
        fmt = _sniff_format(data[:256])
        if fmt == "png":
            w, h, depth, ctype = struct.unpack(">IIBB", data[16:26])
            ch = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(ctype, 4)
            pixels = w * h * ch * (2 if depth > 8 else 1)
            return (pixels <= max_bytes and len(data) <= pixels + h + INLINE_SLACK
                    and _png_chunks_cheap(data))
        if fmt == "jpeg":
            hdr = jpeg_header(data[:ROUTING_PREFIX], "inline-check", first_scan_only=True)
            return (hdr.jpeg_process in (0xC0, 0xC1) and hdr.bits == 8 and hdr.decoded_bytes <= max_bytes
                    and len(data) <= hdr.decoded_bytes + INLINE_SLACK)
        if fmt == "bmp":
            w, h = struct.unpack("<ii", data[18:26])
            (compression,) = struct.unpack("<I", data[30:34])
            return compression == 0 and abs(w) * abs(h) * 4 <= max_bytes
    except Exception:  # a header we cannot read: the worker will say what is wrong with it
        return False
    return False


def _png_chunks_cheap(data: bytes, max_chunks: int = 4096) -> bool:
    """No compressed ancillary chunk, and at most ``max_chunks`` chunks before IEND (else: a worker decides)."""
    i, n = 8, len(data)
    for _ in range(max_chunks):
        if i + 8 > n:
            return False
        length, kind = struct.unpack_from(">I4s", data, i)
        if kind in _PNG_COMPRESSED_ANCILLARY:
            return False
        if kind == b"IEND":
            return True
        i += 12 + length
    return False


@dataclass(eq=False)
class _Job:
    args: tuple
    outer: Future
    shown: str
    client: str
    request: str


class FairQueue:
    """Waiting jobs by client, then by request; :meth:`take` gives the next job of the client with the fewest
    jobs running (ties: the one served longest ago), and within it of the request with the fewest running.
    Not thread-safe: the caller holds its lock."""

    def __init__(self):
        from collections import OrderedDict, deque

        self._deque = deque
        self.waiting: OrderedDict = OrderedDict()  # client -> OrderedDict(request -> deque of jobs)
        self.running: dict = {}  # client -> count, (client, request) -> count

    def __len__(self) -> int:
        return sum(len(q) for reqs in self.waiting.values() for q in reqs.values())

    def put(self, job) -> None:
        reqs = self.waiting.setdefault(job.client, {})
        reqs.setdefault(job.request, self._deque()).append(job)

    def take(self):
        if not self.waiting:
            return None
        client = min(self.waiting, key=lambda c: self.running.get(c, 0))  # first among equals: served longest ago
        reqs = self.waiting.pop(client)
        request = min(reqs, key=lambda r: self.running.get((client, r), 0))
        queue = reqs.pop(request)
        job = queue.popleft()
        if queue:
            reqs[request] = queue  # back of this client's line of requests
        if reqs:
            self.waiting[client] = reqs  # back of the line of clients
        self.running[client] = self.running.get(client, 0) + 1
        self.running[(client, request)] = self.running.get((client, request), 0) + 1
        return job

    def done(self, job) -> None:
        for key in (job.client, (job.client, job.request)):
            n = self.running.get(key, 0) - 1
            if n > 0:
                self.running[key] = n
            else:
                self.running.pop(key, None)

    def remove(self, job) -> bool:
        """Drop a job still waiting; False when it already left the queue."""
        reqs = self.waiting.get(job.client)
        queue = reqs.get(job.request) if reqs else None
        if not reqs or not queue or job not in queue:
            return False
        queue.remove(job)
        if not queue:
            del reqs[job.request]
        if not reqs:
            del self.waiting[job.client]
        return True


class IsolatedDecoder:
    """A pool of decode workers; :meth:`submit` returns a future of a :class:`PackedItem`
    (or of a per-item :class:`~cxr_edge.errors.ImageError` raised from ``result()``)."""

    def __init__(self, spec, limits, isolation: DecodeIsolation = DecodeIsolation(), reduce: bool = False):
        import multiprocessing

        from .extras import require

        pebble = require("pebble")
        # OpenCV's loader puts its own folder first on sys.path while it imports; a worker spawned during that
        # window inherits the path and finds cv2/typing instead of the standard library (every worker then dies
        # at start). Finishing that import here, before any worker exists, closes the window.
        import cv2  # noqa: F401

        self.spec, self.limits, self.isolation = spec, limits, isolation
        self.reduce = reduce  # reduced-resolution JPEG decoding, only for an artifact whose decode gate passed
        self.pool = pebble.ProcessPool(max_workers=isolation.workers, initializer=_limit_worker,
                                       initargs=(isolation.memory_mb,),
                                       context=multiprocessing.get_context(isolation.start_method))
        self.pending = 0  # submitted, not finished: readiness reports a saturated pool
        self.killed = 0  # workers replaced after a deadline or a crash
        self.inline = 0  # decoded in a caller thread because the header bounds them (counted for reports)
        self._lock = threading.Lock()
        self._fair = FairQueue()  # images waiting for a worker, by client and request
        self._in_workers = 0  # images handed to pebble (at most one per worker)
        from concurrent.futures import ThreadPoolExecutor

        self._threads = ThreadPoolExecutor(max_workers=max(1, isolation.workers), thread_name_prefix="decode-inline")

    def submit(self, source, name: str | None = None, keep_preview: bool = False, resize: bool = True,
               client: str | None = None, request: str | None = None) -> Future:
        """Schedule one image; the future's result is a PackedItem, or it raises the item's ImageError.

        ``client`` and ``request`` (e.g. the peer address and the request id) share the workers fairly: a free
        worker takes the next image of the client with the fewest images in workers, and within that client of
        the request with the fewest, so one client's slow uploads wait behind each other, not in front of
        everyone (in a first-come queue, a burst of slow DICOMs from one client held every worker; SECURITY.md).
        """
        shown = name or str(source)
        if isinstance(source, (str, os.PathLike)):
            source, name = self._read(source, name)
        if isinstance(source, (bytearray, memoryview)):
            source = bytes(source)  # one copy, shared by the header check and whichever path decodes
        outer: Future = Future()
        if isinstance(source, bytes) and header_bounded(source, self.isolation.inline_max_bytes):
            inner = self._threads.submit(decode_and_pack, source, name, self.spec, self.limits, keep_preview,
                                         resize, self.reduce)
            with self._lock:
                self.inline += 1
                self.pending += 1
            self._link(inner, outer, shown, cancel_inner=True)
            return outer
        job = _Job((source, name, self.spec, self.limits, keep_preview, resize, self.reduce), outer, shown,
                   client or "", request or "")
        with self._lock:
            self.pending += 1
            self._fair.put(job)
        # a caller that gives up on an image still waiting for a worker frees its place at once
        def withdraw_if_cancelled(f: Future) -> None:
            if f.cancelled():
                self._withdraw(job)

        outer.add_done_callback(withdraw_if_cancelled)
        self._dispatch()
        return outer

    def _withdraw(self, job: _Job) -> None:
        with self._lock:
            if self._fair.remove(job):
                self.pending -= 1

    def _dispatch(self) -> None:
        """Hand waiting images to free workers, fairest first (pebble's own queue is first come, first served,
        so it is only ever given as many tasks as there are workers)."""
        while True:
            with self._lock:
                if self._in_workers >= self.isolation.workers:
                    return
                job = self._fair.take()
                if job is None:
                    return
                self._in_workers += 1
            try:
                inner = self.pool.schedule(decode_and_pack, args=job.args, timeout=self.isolation.seconds)
            except Exception as exc:  # the pool is closing: this image fails, the others are not stranded
                with self._lock:
                    self._in_workers -= 1
                    self.pending -= 1
                    self._fair.done(job)
                if not job.outer.done():
                    job.outer.set_exception(self._failure(exc, job.shown))
                continue
            inner.add_done_callback(lambda _f, job=job: self._released(job))
            self._link(inner, job.outer, job.shown)

    def _released(self, job: _Job) -> None:
        with self._lock:
            self._in_workers -= 1
            self._fair.done(job)
        self._dispatch()

    def _read(self, path, name):
        """A path's bytes, read here (so the header can route it), only when it is a regular file within
        the byte limit; anything else goes to the worker as a path, which reports it as the item's error."""
        import stat as stat_

        p = Path(path)
        try:
            st = p.stat()
        except OSError:
            return path, name
        if not stat_.S_ISREG(st.st_mode) or st.st_size > self.limits.max_bytes:
            return path, name
        try:
            return p.read_bytes(), name or str(path)
        except OSError:
            return path, name

    def _link(self, inner, outer: Future, shown: str, cancel_inner: bool = False) -> None:
        from concurrent.futures import InvalidStateError

        def done(f) -> None:
            with self._lock:
                self.pending -= 1
            if outer.done():  # the caller gave up (timeout, sibling failed): nobody to tell
                return
            try:  # the caller may cancel from its own thread meanwhile
                if f.cancelled():
                    outer.cancel()
                    return
                try:
                    res = f.result()
                except Exception as exc:
                    outer.set_exception(self._failure(exc, shown))
                    return
                if res[0] == "ok":
                    outer.set_result(res[1])
                else:
                    outer.set_exception(error_from(*res[1:]))
            except InvalidStateError:
                pass

        inner.add_done_callback(done)
        if cancel_inner:
            # a thread-pool image not yet started frees its place; one handed to pebble is left alone: it starts
            # at once (pebble only ever holds as many as there are workers), and cancelling a task a worker may
            # already have received makes pebble kill and respawn that worker
            outer.add_done_callback(lambda f: f.cancelled() and not inner.running() and inner.cancel())

    def _failure(self, exc: BaseException, name: str):
        from concurrent.futures import TimeoutError as FutureTimeout

        from .errors import ImageError

        if isinstance(exc, FutureTimeout):
            self.killed += 1
            log.warning("decode of %r ran past %.1f s: worker killed", name, self.isolation.seconds)
            return ImageError(name, f"decoding took longer than {self.isolation.seconds:g} s and was stopped "
                                    "(a crafted or damaged file?); re-export it as a plain PNG or JPEG.")
        code = getattr(exc, "exitcode", None)
        if code is None:  # not a dead worker: the task itself could not be sent or run
            log.warning("decode of %r failed in the pool: %s", name, exc)
            return ImageError(name, f"could not be decoded ({type(exc).__name__}: {exc}).")
        self.killed += 1
        log.warning("decode worker died on %r (%s: exit code %s)", name, type(exc).__name__, code)
        return ImageError(name, f"the decoder crashed on this file (exit code {code}); it is damaged or crafted.")

    def decode(self, source, name: str | None = None, keep_preview: bool = False, resize: bool = True) -> PackedItem:
        return self.submit(source, name, keep_preview, resize).result()

    def warm_up(self) -> None:
        """Start every worker now, not on the first request, because spawning one and importing its libraries is slow."""
        import numpy as np

        blank = np.zeros((64, 64), np.uint8)
        for f in [self.submit(blank, "warm-up") for _ in range(self.isolation.workers)]:
            f.result()

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self.pool.stop()
        self.pool.join(timeout=5)
