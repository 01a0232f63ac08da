"""Dynamic micro-batching: requests from many clients merged into engine batches.

A batch closes when it holds ``max_batch`` images or ``max_delay_ms`` after its first image arrived,
whichever comes first, and at once when no further image is on its way: the service announces
every image it starts decoding (:meth:`DynamicBatcher.expect`), so a lone request is not held for
the delay (a fixed wait cost a single client a large share of its throughput), while under load the
images still being decoded are worth waiting for. Each image carries its own future, so every request
gets exactly its own answers; a full queue is refused up front (the caller answers 503) instead of
growing memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue is at its bound; retry later."""


class ShuttingDown(Exception):
    """The service is draining its queue and accepts no new work."""


@dataclass
class _Job:
    x: np.ndarray
    features: bool
    future: asyncio.Future
    enqueued: float


class DynamicBatcher:
    def __init__(self, engine, max_batch: int = 32, max_delay_ms: float = 5.0, max_queue: int = 256,
                 metrics=None):
        lo, hi = engine.batch_range()
        self.engine = engine
        self.max_batch = max(1, min(max_batch, hi))
        self.max_delay = max_delay_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics
        self.queue: asyncio.Queue[_Job | None] | None = None  # made by start(); None wakes the batcher to stop
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None
        self._closing = False
        self.has_features = "features" in engine.outputs
        self.incoming = 0  # images announced (being decoded) but not yet submitted

    def expect(self, n: int = 1) -> None:
        """``n`` images are on their way (decoding); call :meth:`arrived` for each, submitted or not."""
        self.incoming += n

    def arrived(self, n: int = 1) -> None:
        self.incoming = max(0, self.incoming - n)

    def depth(self) -> int:
        return self.queue.qsize() if self.queue else 0

    @property
    def _q(self) -> asyncio.Queue[_Job | None]:
        assert self.queue is not None, "DynamicBatcher.start() creates the queue before any image is queued"
        return self.queue

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="dynamic-batcher")

    def enqueue(self, x: np.ndarray, features: bool = False, announced: bool = False) -> asyncio.Future:
        """Queue one packed image now; the returned future resolves to its outputs.

        Synchronous on purpose: the queue bound and the ``incoming`` count change in the caller's own
        step of the event loop (``announced``: the image was counted by :meth:`expect`). Cancelling
        the future (a timeout, a client gone) makes the batcher skip the image.
        """
        try:
            if self._closing:
                raise ShuttingDown()
            if self._q.qsize() >= self.max_queue:
                raise QueueFull()
            fut = asyncio.get_running_loop().create_future()
            self._q.put_nowait(_Job(x, features and self.has_features, fut, time.perf_counter()))
        finally:
            if announced:
                self.arrived()
        if self.metrics:
            self.metrics.queue_depth.set(self._q.qsize())
        return fut

    async def submit(self, x: np.ndarray, features: bool = False) -> dict[str, np.ndarray]:
        return await self.enqueue(x, features)

    async def _collect(self) -> list[_Job]:
        first = await self._q.get()
        if first is None:  # stop() woke us up
            return []
        batch = [first]
        deadline = first.enqueued + self.max_delay
        while len(batch) < self.max_batch:
            if self._q.empty() and self.incoming == 0:
                break  # nothing else is coming: waiting would only add latency
            timeout = deadline - time.perf_counter()
            try:
                job = self._q.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._q.get(), timeout)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if job is None:
                break
            batch.append(job)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._closing and self._q.empty():
                return
            batch = await self._collect()
            live = [j for j in batch if not j.future.done()]  # clients that gave up are skipped
            if self.metrics:
                self.metrics.queue_depth.set(self._q.qsize())
            if not live:
                continue
            outputs = ["probs", "features"] if any(j.features for j in live) else ["probs"]
            x = np.stack([j.x for j in live])
            t0 = time.perf_counter()
            try:
                res = await loop.run_in_executor(self.executor, self.engine.infer, x, outputs)
            except Exception as exc:  # a failing engine answers this batch with errors, the service stays up
                log.exception("inference failed for a batch of %d", len(live))
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            if self.metrics:
                self.metrics.batch_size.observe(len(live))
                self.metrics.inference_seconds.observe(time.perf_counter() - t0)
            for k, j in enumerate(live):
                if not j.future.done():
                    j.future.set_result({name: res[name][k] for name in outputs if name == "probs" or j.features})

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new work, answer everything already queued, then stop."""
        self._closing = True
        if self._task:
            await self._q.put(None)  # wakes a batcher idling on an empty queue
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout)
            except asyncio.TimeoutError:
                self._task.cancel()
                while not self._q.empty():
                    job = self._q.get_nowait()
                    if job is not None and not job.future.done():
                        job.future.set_exception(ShuttingDown())
        self.executor.shutdown(wait=True)
