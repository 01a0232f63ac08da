"""One node process: the HTTP screening service, the Storage SCP, the job store and the screening worker.

The worker drains the job store, not an in-memory queue: what it screens is what was committed, so a
restarted node (or another node on the same PostgreSQL store) picks up exactly the unfinished jobs. Decoded
pixels from the intake are kept in memory only as a shortcut; after a restart the worker decodes the stored
file again, in the same bounded decode pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ImageError
from ..serve.app import ScreeningService
from ..serve.batcher import QueueFull
from ..serve.config import ServeConfig
from .config import NodeConfig
from .intake import Intake, Overloaded
from .metrics import NodeMetrics
from .rules import SelectionRules
from .store import FAILED, SCREENED, Claim, JobStore

log = logging.getLogger("cxr_edge.node")

#: decoded images kept between intake and screening (each holds the model input and a preview of <= 1024 px)
MAX_CACHED_ITEMS = 256


class ScreeningNode:
    """The DICOM node around one :class:`ScreeningService`. ``start``/``stop`` run in the app's lifespan."""

    def __init__(self, artifact: str | Path, serve_config: ServeConfig, config: NodeConfig, engine_wrapper=None):
        self.config = config
        if serve_config.max_body_mb < config.max_instance_mb:  # one byte limit for an instance, whichever way it came
            serve_config = dataclasses.replace(serve_config, max_body_mb=config.max_instance_mb)
        self.service = ScreeningService(artifact, serve_config, engine_wrapper)
        self.rules = SelectionRules.load(config.rules)
        self.store = JobStore(config.url, config.identity)
        self.metrics = NodeMetrics(self.service.metrics.registry)
        self.cache: dict[int, Any] = {}
        self.intake: Intake | None = None
        self.scp: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wake: asyncio.Event | None = None
        self.tasks: list[asyncio.Task] = []
        self.results_task: asyncio.Task | None = None
        self.in_flight: set[asyncio.Task] = set()
        self.jobs_in_flight = 0
        self.results_queue: asyncio.Queue = asyncio.Queue()
        self.stopping = False
        self.model: dict[str, Any] = {}

    # ---- lifecycle
    def open_store(self) -> None:
        """The job store and audit trail, checked writable before anything else starts: a node that cannot
        record what it receives must not receive anything."""
        try:
            self.store.migrate()
            self.store.record("node_starting", detail={"store": self.store.describe(), "ae_title": self.config.ae_title,
                                                       "port": self.config.dicom_port, "rules": self.rules.source})
        except Exception as exc:
            raise ConfigError(f"the job store and audit trail ({self.store.describe()}) are not writable: "
                              f"{type(exc).__name__}: {exc}. The node does not start without them; check --data / "
                              "--store and the folder's permissions.") from exc

    async def start(self) -> None:
        from .scp import StorageSCP

        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        resumed = await self.loop.run_in_executor(None, self.store.release_own_claims)
        if resumed:
            log.info("resuming %d job(s) this node had started before it stopped", resumed)
        self.intake = Intake(self.store, self.config, self.rules, self._decode_for_intake, self._queued,
                             self.service.limits, lambda outcome: self.metrics.instances.labels(outcome).inc())
        self.model = self.model_record()  # fixed for the node's life: every result and record carries it
        await self.loop.run_in_executor(None, lambda: self.store.record("node_started", detail={"model": self.model}))
        self.tasks = [asyncio.create_task(self._screen_loop(), name="node-screening"),
                      asyncio.create_task(self._study_loop(), name="node-studies")]
        self.results_task = asyncio.create_task(self._results_loop(), name="node-results")
        self.scp = StorageSCP(self.config, self.intake, self.store, self.metrics).start()

    async def stop(self) -> None:
        """No new associations, then the worker stops; jobs it had claimed stay claimed by this node, and the
        next start puts them back in the queue (nothing acknowledged is dropped)."""
        self.stopping = True
        if self.scp is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.scp.stop)
        for t in self.tasks:  # no new claims; the results loop runs on until the jobs in flight are recorded
            t.cancel()
        pending = list(self.in_flight)
        if pending:  # jobs already being screened finish if they can within the drain time
            await asyncio.wait(pending, timeout=self.service.config.timeout_s)
        tasks = self.tasks + ([self.results_task] if self.results_task is not None else [])
        if self.results_task is not None:
            self.results_task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            self.store.record("node_stopped")
        except Exception as exc:
            log.error("could not record the node's stop in the audit trail: %s", exc)
        self.store.close()

    def build_app(self):
        from .http_routes import add_node_routes

        return self.service.build_app(extend=lambda app: add_node_routes(app, self), on_start=self.start,
                                      on_stop=self.stop)

    # ---- what every record says about the model
    def model_record(self) -> dict[str, Any]:
        svc = self.service
        m, info = svc.loaded_engine.manifest, svc.engine_info
        return {"artifact": m.file, "recipe": m.recipe, "version": f"v{m.revision}", "sha256": m.sha256,
                "precision": info.precision, "backend": info.backend, "provider": info.provider,
                "threshold": svc.step.threshold, "operating_point": svc.operating_point}

    # ---- intake side (association threads)
    def _decode_for_intake(self, data: bytes, name: str, client: str):
        """Decode + pack in the service's bounded pool (per-image deadline and memory ceiling), from a thread."""
        fut = self.service.submit_decode(data, name, self.keep_preview, client, name)
        try:
            return fut.result(timeout=self.config.ack_timeout_s)
        except concurrent.futures.TimeoutError as exc:
            fut.cancel()
            raise Overloaded(f"not decoded within {self.config.ack_timeout_s:.0f} s (the node is overloaded); "
                             "retry later") from exc

    @property
    def keep_preview(self) -> bool:
        """The decoded preview is kept only when an overlay may be drawn on it."""
        return self.config.heatmaps != "none"

    def _queued(self, job_id: int, item) -> None:
        if len(self.cache) < MAX_CACHED_ITEMS:
            self.cache[job_id] = item
        if self.loop is not None and self.wake is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.wake.set)

    # ---- the worker
    async def _screen_loop(self) -> None:
        """Claim what the store holds, in batches: one engine batch, one Grad-CAM batch and one commit per claim
        batch (Grad-CAM through a dense head costs ~5x less per image in a batch of 16 than alone)."""
        loop = asyncio.get_running_loop()
        assert self.wake is not None
        limit = max(1, self.config.screen_concurrency)
        batch = max(1, min(self.service.config.max_batch, limit))
        while not self.stopping:
            free = limit - self.jobs_in_flight
            claims: list[Claim] = []
            if free > 0:
                try:
                    claims = await loop.run_in_executor(None, self.store.claim, min(free, batch), self.config.lease_s,
                                                        self.config.shared_storage)
                except Exception as exc:  # the store is unreachable for a moment: try again, never crash the node
                    log.error("could not claim jobs: %s: %s", type(exc).__name__, exc)
                    await asyncio.sleep(1.0)
                    continue
            if claims:
                self.jobs_in_flight += len(claims)
                task = asyncio.create_task(self._screen_batch(claims))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
            self.metrics.in_flight.set(self.jobs_in_flight)
            if not claims:
                self.wake.clear()
                try:  # woken by the intake; the timeout polls for other nodes' jobs and expired leases
                    await asyncio.wait_for(self.wake.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

    async def _item_for(self, claim: Claim):
        """The decoded image: from the intake's memory, or (after a restart) decoded again from the stored file."""
        item = self.cache.pop(claim.job.id, None)
        if item is not None:
            return item
        job = claim.job
        if not job.path or not Path(job.path).is_file():
            raise ImageError(job.sop_instance_uid, f"the stored instance file is missing ({job.path}); it was received "
                                                   "by another node or removed. Ask the sender to send it again.")
        data = await asyncio.get_running_loop().run_in_executor(None, Path(job.path).read_bytes)
        name = f"{job.sop_instance_uid}.dcm"
        return await asyncio.wrap_future(self.service.submit_decode(data, name, self.keep_preview, job.source, name))

    async def _engine_item(self, claim: Claim):
        """The item at the engine's input size, whichever way it was decoded (the GPU path resizes on the device)."""
        return await self.service.ready_for_engine(await self._item_for(claim))

    async def _infer(self, item, explain: bool) -> dict:
        while True:
            try:
                return await self.service.live_batcher.enqueue(item.packed, features=explain)
            except QueueFull:  # HTTP clients fill the queue: the durable job waits its turn
                await asyncio.sleep(0.05)

    async def _screen_batch(self, claims: list[Claim]) -> None:
        loop = asyncio.get_running_loop()
        explain = self.explain
        outcomes: list[tuple[Claim, dict[str, Any] | None, str | None, str | None]] = []
        try:
            items = await asyncio.gather(*(self._engine_item(c) for c in claims), return_exceptions=True)
            ready = []
            for c, item in zip(claims, items):
                if isinstance(item, ImageError):
                    outcomes.append((c, None, item.reason, None))
                elif isinstance(item, BaseException):
                    outcomes.append((c, None, f"screening failed: {type(item).__name__}: {item}", None))
                else:
                    ready.append((c, item))
            if ready:
                outs = await asyncio.gather(*(self._infer(item, explain) for _, item in ready), return_exceptions=True)
                done = [(c, item, o) for (c, item), o in zip(ready, outs) if not isinstance(o, BaseException)]
                outcomes += [(c, None, f"screening failed: {type(o).__name__}: {o}", None)
                             for (c, _), o in zip(ready, outs) if isinstance(o, BaseException)]
                if done:
                    outcomes += await self._explained(done)
            await loop.run_in_executor(None, self._finish_all, outcomes)
        except asyncio.CancelledError:
            raise
        except Exception:  # the store failed: these claims lapse and are screened again (never two results)
            log.exception("a batch of %d job(s) could not be recorded; their claims lapse and they are retried", len(claims))
        finally:
            self.jobs_in_flight -= len(claims)
            for c in claims:
                self.cache.pop(c.job.id, None)

    @property
    def explain(self) -> bool:
        """Whether results may get a Grad-CAM map: the artifact has an engine-native head and maps are wanted."""
        return self.service.head is not None and self.config.heatmaps != "none"

    async def _explained(self, done):
        """Results of inferred jobs through one shared queue: the step (decision + Grad-CAM) runs on everything
        waiting when the previous call ends, so jobs that arrive one by one are still explained in batches (the
        Grad-CAM head's dense layers read their weights once per call: ~5x cheaper per image at 16 than at 1)."""
        fut = asyncio.get_running_loop().create_future()
        await self.results_queue.put((done, fut))
        return await fut

    async def _results_loop(self) -> None:
        loop = asyncio.get_running_loop()
        svc = self.service
        while True:
            first = await self.results_queue.get()
            waiting = [first]
            size = len(first[0])
            while size < svc.config.max_batch and not self.results_queue.empty():
                nxt = self.results_queue.get_nowait()
                waiting.append(nxt)
                size += len(nxt[0])
            jobs = [d for w in waiting for d in w[0]]
            try:
                out = await loop.run_in_executor(svc.decode_pool, self._results, jobs)
            except Exception as exc:
                out = [(c, None, f"screening failed: {type(exc).__name__}: {exc}", None) for c, _, _ in jobs]
            k = 0
            for done, fut in waiting:
                if not fut.done():
                    fut.set_result(out[k:k + len(done)])
                k += len(done)

    def _results(self, done) -> list[tuple[Claim, dict[str, Any] | None, str | None, str | None]]:
        """The screening step for a batch of jobs (one Grad-CAM call), and each overlay written beside the results:
        a JPEG of the preview with the map over it (the kiosk shows it; a PNG took 10-15x longer to encode), and the
        raw map as .npy for anything that renders it again."""
        import cv2
        import numpy as np

        svc = self.service
        now = time.time()
        probs = np.stack([o["probs"] for _, _, o in done])
        timings = [{"arrival_to_inference": 1e3 * (now - c.job.received_at)} for c, _, _ in done]
        names = [c.job.sop_instance_uid for c, _, _ in done]
        explain = self.explain
        if explain and self.config.heatmaps == "all":  # decision and Grad-CAM in one step
            results = svc.step.results(list(range(len(done))), names, probs, timings, svc.preprocess, True,
                                       np.stack([o["features"] for _, _, o in done]))
            wanted = []
        else:  # decide first; the map only for what the policy flags (COVID or borderline)
            results = svc.step.results(list(range(len(done))), names, probs, timings, svc.preprocess)
            wanted = [k for k, r in enumerate(results) if explain and (
                r.label == "COVID" or bool(r.decision and r.decision.borderline))]
        if wanted:  # Grad-CAM of the decided class, one batched call
            features = np.stack([done[k][2]["features"] for k in wanted])
            explained = svc.step.results(wanted, [names[k] for k in wanted], probs[wanted], [timings[k] for k in wanted],
                                         svc.preprocess, True, features)
            for k, r in zip(wanted, explained):
                results[k] = r
        out: list[tuple[Claim, dict[str, Any] | None, str | None, str | None]] = []
        for (claim, item, _), r in zip(done, results):
            overlay_path = None
            if explain and r.explanation is not None and r.explanation.cam is not None and item.preview is not None:
                from ..runtime.overlay import overlay

                folder = self.config.result_dir / time.strftime("%Y%m%d", time.gmtime(claim.job.received_at))
                folder.mkdir(parents=True, exist_ok=True)
                base = folder / f"job-{claim.job.id}"
                ok, buf = cv2.imencode(".jpg", overlay(item.preview, r.explanation.cam), [cv2.IMWRITE_JPEG_QUALITY, 90])
                if ok:
                    Path(f"{base}-overlay.jpg").write_bytes(buf.tobytes())
                    np.save(f"{base}-cam.npy", r.explanation.cam)
                    overlay_path = f"{base}-overlay.jpg"
                    r.explanation.files = {"overlay": Path(overlay_path).name, "cam": Path(f"{base}-cam.npy").name}
            d = r.to_dict()
            d["model"] = self.model
            out.append((claim, d, None, overlay_path))
        return out

    def _finish_all(self, outcomes) -> None:
        """Record a batch of outcomes in one transaction (one fsync), then delete the screened pixels."""
        if not outcomes:
            return
        records = []
        for claim, result, reason, overlay in outcomes:
            if result is not None:
                decision = result.get("decision") or {}
                detail = {"model": result["model"], "label": result.get("label"),
                          "p_covid": (result.get("probabilities") or {}).get("COVID"),
                          "threshold": result.get("threshold"), "borderline": decision.get("borderline"),
                          "operating_point": result["model"]["operating_point"]}
                records.append((claim, SCREENED, result, None, overlay, "screened", detail))
            else:
                records.append((claim, FAILED, None, reason, None, "failed", {"reason": reason}))
        kept = self.store.finish_many(records, forget_pixels=not self.config.keep_pixels)
        now = time.time()
        for (claim, state, _, _, overlay, _, _), ok in zip(records, kept):
            job = claim.job
            if not ok:
                log.warning("job %d: another node took it after this node's claim lapsed; its result is kept, not ours",
                            job.id)
                if overlay:
                    Path(overlay).unlink(missing_ok=True)
                    Path(overlay.replace("-overlay.jpg", "-cam.npy")).unlink(missing_ok=True)
                continue
            self.metrics.jobs.labels(state).inc()
            self.metrics.instance_latency.observe(max(0.0, now - job.received_at))
            if not self.config.keep_pixels and job.path:
                Path(job.path).unlink(missing_ok=True)  # retention: received pixels go, the result stays

    async def _study_loop(self) -> None:
        """Complete studies that have been quiet for ``stable_after_s`` and have no unfinished job."""
        loop = asyncio.get_running_loop()
        quiet = self.config.stable_after_s
        while not self.stopping:
            try:
                for uid in await loop.run_in_executor(None, self.store.stable_studies, quiet):
                    summary = await loop.run_in_executor(None, self.store.complete_study, uid, quiet)
                    if summary is not None and summary.get("first_arrival_epoch") is not None:
                        self.metrics.study_latency.observe(time.time() - summary["first_arrival_epoch"])
                self.metrics.queue.set(await loop.run_in_executor(None, self.store.pending))
            except Exception as exc:
                log.error("study completion pass failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(min(1.0, max(0.1, quiet / 4)))
