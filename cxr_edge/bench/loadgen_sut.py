"""Systems under test for LoadGen: an engine called directly on packed tensors, one way per scenario.

SingleStream and MultiStream answer each query in LoadGen's own issue call (one sample; N samples as one batch),
Offline runs its one large query in batches, and Server hands samples to a small dynamic batcher thread (a maximum
batch and a maximum wait, as the HTTP service batches), so LoadGen's issue thread never waits on the engine.
Every response carries the sample's probabilities as float32 bytes, which is what LoadGen's accuracy log keeps.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .loadgen_qsl import SampleLibrary
from .loadgen_settings import Estimate

log = logging.getLogger(__name__)



class Responder:
    """Answers LoadGen: each sample's probabilities as float32 bytes (NaN when it failed), failures counted."""

    def __init__(self, lg, n_classes: int):
        self.lg = lg
        self.failed_row = np.full(n_classes, np.nan, np.float32)
        self.failures = 0
        self.first_failure: str | None = None
        self._lock = threading.Lock()

    def __call__(self, ids: Sequence[int], probs: np.ndarray | None, why: str | None = None) -> None:
        if probs is None:
            with self._lock:
                self.failures += len(ids)
                self.first_failure = self.first_failure or why
            rows = [self.failed_row] * len(ids)
        else:
            rows = [np.ascontiguousarray(p, np.float32) for p in np.atleast_2d(probs)]  # one row per sample
        # LoadGen copies the bytes during the call (accuracy log), so the arrays need to live only until it returns
        self.lg.QuerySamplesComplete([self.lg.QuerySampleResponse(q, r.ctypes.data, r.nbytes) for q, r in zip(ids, rows)])


class Batcher:
    """A dynamic batcher: samples queue up; a batch goes to the engine when full or when its first sample has
    waited ``max_delay_s``, whichever comes first."""

    def __init__(self, run: Callable[[list[tuple[int, int]]], None], max_batch: int, max_delay_s: float):
        self.run, self.max_batch, self.max_delay_s = run, max_batch, max_delay_s
        self.q: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self.sizes: dict[int, int] = {}
        self.thread = threading.Thread(target=self._loop, name="loadgen-batcher", daemon=True)
        self.thread.start()

    def put(self, samples) -> None:
        for s in samples:
            self.q.put((s.id, s.index))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            first = self.q.get()
            if first is None:
                return
            batch, stop = self._fill([first])
            self.sizes[len(batch)] = self.sizes.get(len(batch), 0) + 1
            self.run(batch)
            if stop:
                return

    def _fill(self, batch: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], bool]:
        """More samples for the batch until it is full or the first one's wait is over; True: close was asked."""
        deadline = time.perf_counter() + self.max_delay_s
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                item = self.q.get(timeout=left) if left > 0 else self.q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False


class DirectSystem:
    """An engine (any backend, any precision) answering LoadGen's queries on packed tensors in this process."""

    kind = "tensor"
    target = "direct"

    def __init__(self, engine, library: SampleLibrary, respond: Responder, batch_size: int, max_batch: int,
                 max_delay_ms: float):
        self.engine, self.library, self.respond = engine, library, respond
        self.batch_size, self.max_batch, self.max_delay_s = batch_size, max_batch, max_delay_ms / 1e3
        self.batcher: Batcher | None = None
        self._timed: dict[int, float] = {}  # batch size -> median seconds per call

    def infer(self, indices: Sequence[int]) -> np.ndarray:
        return self.engine.infer(self.library.tensors(indices), ["probs"])["probs"]

    def issue_for(self, scenario: str) -> Callable[[list], None]:
        """LoadGen's issue callback for one scenario."""
        if scenario == "Server":
            self.batcher = Batcher(self._run_batch, self.max_batch, self.max_delay_s)
            return self.batcher.put
        step = self.batch_size if scenario == "Offline" else None

        def issue(samples) -> None:
            chunk = step or len(samples)
            for k in range(0, len(samples), chunk):
                part = samples[k : k + chunk]
                self._run_batch([(s.id, s.index) for s in part])

        return issue

    def _run_batch(self, batch: list[tuple[int, int]]) -> None:
        ids = [q for q, _ in batch]
        try:
            probs = self.infer([i for _, i in batch])
        except Exception as exc:  # answered as failed, so LoadGen never waits for a sample that will not come
            log.error("the engine failed on a batch of %d: %s", len(batch), exc)
            self.respond(ids, None, f"{type(exc).__name__}: {exc}")
            return
        self.respond(ids, probs)

    def end_scenario(self) -> dict[str, Any]:
        """Stop the Server batcher, if any, and say what batches it made."""
        if self.batcher is None:
            return {}
        self.batcher.close()
        sizes, self.batcher = self.batcher.sizes, None
        return {"batch_sizes": dict(sorted(sizes.items()))}

    def estimate(self, scenario: str, budget_s: float) -> Estimate:
        """Single-sample latency and the scenario's batched throughput, timed on a few loaded samples before LoadGen
        starts (``budget_s`` each; every batch size is timed once per command)."""
        batch = self.max_batch if scenario == "Server" else self.batch_size
        n = min(len(self.library.source), max(self.batch_size, self.max_batch))
        idx = list(range(n))
        self.library.load(idx)
        try:
            if 1 not in self._timed:
                self._timed[1] = _time(lambda: self.infer(idx[:1]), budget_s / 2)
            if batch not in self._timed:
                many = [idx[k % n] for k in range(batch)]
                self._timed[batch] = _time(lambda: self.infer(many), budget_s)
        finally:
            self.library.unload(idx)
        return Estimate(self._timed[1], batch / self._timed[batch],
                        f"engine: batch 1 for {budget_s / 2:g} s, batch {batch} for {budget_s:g} s")

    def close(self) -> None:
        self.end_scenario()


def _time(fn: Callable[[], Any], budget_s: float) -> float:
    """Median seconds per call over about ``budget_s`` (one warm-up call first)."""
    fn()
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))
