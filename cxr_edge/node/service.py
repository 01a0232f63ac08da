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

from ..decode_workers import decode_and_pack, error_from
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
        self.in_flight: set[asyncio.Task] = set()
        self.stopping = False

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
        model = self.model_record()
        await self.loop.run_in_executor(None, lambda: self.store.record("node_started", detail={"model": model}))
        self.tasks = [asyncio.create_task(self._screen_loop(), name="node-screening"),
                      asyncio.create_task(self._study_loop(), name="node-studies")]
        self.scp = StorageSCP(self.config, self.intake, self.store, self.metrics).start()

    async def stop(self) -> None:
        """No new associations, then the worker stops; jobs it had claimed stay claimed by this node, and the
        next start puts them back in the queue (nothing acknowledged is dropped)."""
        self.stopping = True
        if self.scp is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.scp.stop)
        for t in self.tasks:
            t.cancel()
        pending = list(self.in_flight)
        if pending:  # jobs already being screened finish if they can within the drain time
            await asyncio.wait(pending, timeout=self.service.config.timeout_s)
        await asyncio.gather(*self.tasks, return_exceptions=True)
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
        svc = self.service
        resize = svc.preprocess != "gpu"
        if svc.decoder is None:
            res = decode_and_pack(data, name, svc.loaded_engine.spec, svc.limits, True, resize)
            if res[0] != "ok":
                raise error_from(*res[1:])
            return res[1]
        fut = svc.decoder.submit(data, name, keep_preview=True, resize=resize, client=client, request=name)
        try:
            return fut.result(timeout=self.config.ack_timeout_s)
        except concurrent.futures.TimeoutError as exc:
            fut.cancel()
            raise Overloaded(f"not decoded within {self.config.ack_timeout_s:.0f} s (the node is overloaded); "
                             "retry later") from exc

    def _queued(self, job_id: int, item) -> None:
        if len(self.cache) < MAX_CACHED_ITEMS:
            self.cache[job_id] = item
        if self.loop is not None and self.wake is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.wake.set)

    # ---- the worker
    async def _screen_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.wake is not None
        limit = max(1, self.config.screen_concurrency)
        while not self.stopping:
            free = limit - len(self.in_flight)
            claims: list[Claim] = []
            if free > 0:
                try:
                    claims = await loop.run_in_executor(None, self.store.claim, free, self.config.lease_s,
                                                        self.config.shared_storage)
                except Exception as exc:  # the store is unreachable for a moment: try again, never crash the node
                    log.error("could not claim jobs: %s: %s", type(exc).__name__, exc)
                    await asyncio.sleep(1.0)
                    continue
            for c in claims:
                task = asyncio.create_task(self._screen(c))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
            self.metrics.in_flight.set(len(self.in_flight))
            if not claims:
                self.wake.clear()
                try:  # woken by the intake; the timeout polls for other nodes' jobs and expired leases
                    await asyncio.wait_for(self.wake.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

    async def _item_for(self, claim: Claim):
        item = self.cache.pop(claim.job.id, None)
        if item is not None:
            return item
        job = claim.job
        if not job.path or not Path(job.path).is_file():
            raise ImageError(job.sop_instance_uid, f"the stored instance file is missing ({job.path}); it was received "
                                                   "by another node or removed. Ask the sender to send it again.")
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, Path(job.path).read_bytes)
        return await loop.run_in_executor(None, self._decode_for_intake, data, f"{job.sop_instance_uid}.dcm",
                                          job.source)

    async def _screen(self, claim: Claim) -> None:
        loop = asyncio.get_running_loop()
        svc, job = self.service, claim.job
        try:
            try:
                item = await self._item_for(claim)
            except ImageError as exc:
                await loop.run_in_executor(None, self._finish, claim, None, exc.reason, None)
                return
            if svc.preprocess == "gpu":
                item.packed = await loop.run_in_executor(svc.decode_pool, svc._gpu_resize, item.packed)
            explain = svc.head is not None
            while True:
                try:
                    out = await svc.live_batcher.enqueue(item.packed, features=explain)
                    break
                except QueueFull:  # HTTP clients fill the queue: the durable job waits its turn
                    await asyncio.sleep(0.05)
            result, overlay = await loop.run_in_executor(svc.decode_pool, self._result, job, out, item, explain)
            await loop.run_in_executor(None, self._finish, claim, result, None, overlay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # engine or store failure: the job fails with the reason, the node goes on
            log.exception("screening job %d failed", job.id)
            try:
                await loop.run_in_executor(None, self._finish, claim, None,
                                           f"screening failed: {type(exc).__name__}: {exc}", None)
            except Exception:
                log.exception("could not record the failure of job %d; its claim lapses and it is retried", job.id)
        finally:
            self.cache.pop(job.id, None)

    def _result(self, job, out, item, explain: bool) -> tuple[dict[str, Any], str | None]:
        """The screening step's result for one job, and its overlay PNG written beside the results."""
        import cv2

        svc = self.service
        timings = {"arrival_to_inference": 1e3 * (time.time() - job.received_at)}
        features = out["features"][None] if explain else None
        r = svc.step.results([0], [job.sop_instance_uid], out["probs"][None], [timings], svc.preprocess, explain,
                             features)[0]
        overlay_path = None
        if explain and r.explanation is not None and item.preview is not None:
            from ..runtime.overlay import overlay

            assert r.explanation.cam is not None
            folder = self.config.result_dir / time.strftime("%Y%m%d", time.gmtime(job.received_at))
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"job-{job.id}-overlay.png"
            ok, buf = cv2.imencode(".png", overlay(item.preview, r.explanation.cam))
            if ok:
                path.write_bytes(buf.tobytes())
                overlay_path = str(path)
        d = r.to_dict()
        d["model"] = self.model_record()
        return d, overlay_path

    def _finish(self, claim: Claim, result: dict[str, Any] | None, reason: str | None, overlay: str | None) -> None:
        job = claim.job
        if result is not None:
            decision = result.get("decision") or {}
            detail = {"model": result["model"], "label": result.get("label"),
                      "p_covid": (result.get("probabilities") or {}).get("COVID"), "threshold": result.get("threshold"),
                      "borderline": decision.get("borderline"), "operating_point": result["model"]["operating_point"]}
            ok = self.store.finish(claim, state=SCREENED, result=result, reason=None, overlay_path=overlay,
                                   audit_event="screened", audit_detail=detail)
        else:
            ok = self.store.finish(claim, state=FAILED, result=None, reason=reason, overlay_path=None,
                                   audit_event="failed", audit_detail={"reason": reason})
        if not ok:
            log.warning("job %d: another node took it after this node's claim lapsed; its result is kept, not ours",
                        job.id)
            if overlay:
                Path(overlay).unlink(missing_ok=True)
            return
        self.metrics.jobs.labels(SCREENED if result is not None else FAILED).inc()
        self.metrics.instance_latency.observe(max(0.0, time.time() - job.received_at))
        if not self.config.keep_pixels and job.path:
            Path(job.path).unlink(missing_ok=True)  # retention: received pixels go, the result stays
            self.store.forget_pixels(job.id)

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
                counts = await loop.run_in_executor(None, self.store.counts)
                self.metrics.queue.set(counts.get("received", 0) + counts.get("screening", 0))
            except Exception as exc:
                log.error("study completion pass failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(min(1.0, max(0.1, quiet / 4)))
