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
import datetime
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ImageError
from ..serve.app import ScreeningService
from ..serve.batcher import QueueFull
from ..serve.config import ServeConfig
from . import delivery
from .config import NodeConfig
from .intake import Intake, Overloaded
from .metrics import NodeMetrics
from .outbox import Outbox
from .rules import SelectionRules
from .store import FAILED, SCREENED, Claim, JobStore

log = logging.getLogger("cxr_edge.node")

#: decoded images kept between intake and screening (each holds the model input and a preview of <= 1024 px)
MAX_CACHED_ITEMS = 256


class DaemonPool:
    """A fixed set of daemon worker threads. Why not ThreadPoolExecutor: its threads are joined at interpreter exit,
    so a send stuck in a peer's timeout would hold a stopping node for minutes; and not a thread per call: the job
    store keeps one connection per thread, so short-lived threads would leak a database connection each."""

    def __init__(self, size: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{k}", daemon=True) for k in range(max(1, size))]
        for t in self._threads:
            t.start()

    def submit(self, fn) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, fut))
        return fut

    def _work(self) -> None:
        while True:
            fn, fut = self._queue.get()
            if fn is None:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to whoever awaits the future
                fut.set_exception(exc)

    def shutdown(self) -> None:
        """Workers finish what they run and stop; queued calls are cancelled."""
        while True:
            try:
                _, fut = self._queue.get_nowait()
            except queue.Empty:
                break
            if fut is not None:
                fut.cancel()
        for _ in self._threads:
            self._queue.put((None, None))


def _log_failure(task: asyncio.Task) -> None:
    """A delivery batch that failed outside the sender (the store, most likely): its rows stay claimed and come
    due after their lease, so nothing is lost; say so once."""
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("a delivery batch could not be recorded (%s: %s); its objects are sent again after their lease",
                  type(exc).__name__, exc)


class ScreeningNode:
    """The DICOM node around one :class:`ScreeningService`. ``start``/``stop`` run in the app's lifespan."""

    def __init__(self, artifact: str | Path, serve_config: ServeConfig, config: NodeConfig, engine_wrapper=None):
        self.config = config
        if serve_config.max_body_mb < config.max_instance_mb:  # one byte limit for an instance, whichever way it came
            serve_config = dataclasses.replace(serve_config, max_body_mb=config.max_instance_mb)
        self.service = ScreeningService(artifact, serve_config, engine_wrapper)
        self.rules = SelectionRules.load(config.rules)
        self.store = JobStore(config.url, config.identity)
        self.outbox = Outbox(self.store)
        self.deliver_wake: asyncio.Event | None = None
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
        self.deliver_wake = asyncio.Event()
        resumed = await self.loop.run_in_executor(None, self.store.release_own_claims)
        if resumed:
            log.info("resuming %d job(s) this node had started before it stopped", resumed)
        resent = await self.loop.run_in_executor(None, self.outbox.release_own)
        if resent:
            log.info("resending %d result object(s) this node was sending when it stopped", resent)
        stranded = await self.loop.run_in_executor(None, self.outbox.strand_unconfigured,
                                                   [d.name for d in self.config.destinations])
        if stranded:
            log.warning("%d result object(s) were waiting for destinations this node no longer has: dead-lettered "
                        "with the reason (GET /v1/outbox?state=dead); --send-to NAME=URL --redeliver sends them", stranded)
        if self.config.redeliver:
            names = [d.name for d in self.config.destinations]
            outcome = await self.loop.run_in_executor(None, self.outbox.redeliver, names)
            log.warning("--redeliver: %s", ", ".join(f"{k} {v}" for k, v in outcome.items()))
        self.intake = Intake(self.store, self.config, self.rules, self._decode_for_intake, self._queued,
                             self.service.limits, lambda outcome: self.metrics.instances.labels(outcome).inc())
        self.model = self.model_record()  # fixed for the node's life: every result and record carries it
        await self.loop.run_in_executor(None, lambda: self.store.record("node_started", detail={"model": self.model}))
        self.tasks = [asyncio.create_task(self._screen_loop(), name="node-screening"),
                      asyncio.create_task(self._study_loop(), name="node-studies"),
                      asyncio.create_task(self._delivery_loop(), name="node-delivery")]
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
        from .result_objects import model_record

        svc = self.service
        return model_record(svc.loaded_engine.manifest, svc.engine_info, svc.step.threshold, svc.operating_point)

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
        outcomes: list[tuple] = []
        try:
            items = await asyncio.gather(*(self._engine_item(c) for c in claims), return_exceptions=True)
            ready = []
            for c, item in zip(claims, items):
                if isinstance(item, ImageError):
                    outcomes.append((c, None, item.reason, None, ()))
                elif isinstance(item, BaseException):
                    outcomes.append((c, None, f"screening failed: {type(item).__name__}: {item}", None, ()))
                else:
                    ready.append((c, item))
            if ready:
                outs = await asyncio.gather(*(self._infer(item, explain) for _, item in ready), return_exceptions=True)
                done = [(c, item, o) for (c, item), o in zip(ready, outs) if not isinstance(o, BaseException)]
                outcomes += [(c, None, f"screening failed: {type(o).__name__}: {o}", None, ())
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
                out = [(c, None, f"screening failed: {type(exc).__name__}: {exc}", None, ()) for c, _, _ in jobs]
            k = 0
            for done, fut in waiting:
                if not fut.done():
                    fut.set_result(out[k:k + len(done)])
                k += len(done)

    def _results(self, done) -> list[tuple]:
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
        out: list[tuple] = []
        for (claim, item, _), r in zip(done, results):
            overlay_path = blended = None
            folder = self.config.result_dir / time.strftime("%Y%m%d", time.gmtime(claim.job.received_at))
            expl = r.explanation
            cam = expl.cam if expl is not None else None
            if explain and expl is not None and cam is not None and item.preview is not None:
                from ..runtime.overlay import overlay

                folder.mkdir(parents=True, exist_ok=True)
                base = folder / f"job-{claim.job.id}"
                # once: the kiosk's JPEG, and the SC's picture; the radiograph in gray, uncoloured, when the map shows
                # no localised evidence (the raw map is still saved as measured, below)
                blended = overlay(item.preview, cam)
                ok, buf = cv2.imencode(".jpg", blended, [cv2.IMWRITE_JPEG_QUALITY, 90])
                if ok:
                    Path(f"{base}-overlay.jpg").write_bytes(buf.tobytes())
                    np.save(f"{base}-cam.npy", cam)
                    overlay_path = f"{base}-overlay.jpg"
                    expl.files = {"overlay": Path(overlay_path).name, "cam": Path(f"{base}-cam.npy").name}
            d = r.to_dict()
            d["model"] = self.model
            objects = self._result_objects(claim, d, item.preview, cam, folder, blended) if self.config.destinations \
                else ()
            out.append((claim, d, None, overlay_path, objects))
        return out

    def _result_objects(self, claim: Claim, result: dict[str, Any], preview, cam, folder: Path, blended=None) -> tuple:
        """The result objects of one screened job (DICOM objects, and one HL7 message per HL7 destination), written
        and fsynced before the result is committed, so an outbox row always points at a complete file. A kind that
        cannot be made (a header the writer cannot use, a full disk) becomes an outbox row that is dead from the
        start with the reason: never a result that silently has no report."""
        from . import result_objects as ro

        job = claim.job
        sha = self.model.get("sha256")
        when = datetime.datetime.fromtimestamp(job.received_at, datetime.timezone.utc)
        takes = {k for d in self.config.destinations for k in d.takes}
        kinds = tuple(k for k in self.config.dicom_objects if k in takes)
        hl7_dests = [d for d in self.config.destinations if d.kind == "mllp"]
        out: list[tuple] = []

        def failed(kind: str, uid: str, sop_class: str, why: str, only: str | None = None) -> None:
            log.error("job %d: %s", job.id, why)
            self.metrics.objects_failed.inc()
            out.append((kind, uid, sop_class, "", only, why))

        try:
            if not job.path or not Path(job.path).is_file():
                raise FileNotFoundError(f"the received instance {job.path} is gone")
            source = ro.read_source(job.path)
        except Exception as exc:
            why = f"the source header could not be read again: {type(exc).__name__}: {exc}"
            for kind in ro.wanted_kinds(kinds, cam is not None and preview is not None):
                failed(kind, ro.result_uid(job.sop_instance_uid, sha, kind), ro.SOP_CLASS[kind], why)
            for d in hl7_dests:
                failed("hl7", f"{job.sop_instance_uid}@{d.name}", "ORU^R01", why, d.name)
            return tuple(out)
        errors: dict[str, str] = {}
        objs = ro.build(source, result, self.model, preview=preview, cam=cam, kinds=kinds, station=self.config.ae_title,
                        when=when, errors=errors, blended=blended)
        for kind, why in errors.items():
            failed(kind, ro.result_uid(job.sop_instance_uid, sha, kind), ro.SOP_CLASS[kind], why)
        for o in objs:
            try:
                out.append((o.kind, o.sop_instance_uid, ro.SOP_CLASS[o.kind], str(o.write(folder, f"job-{job.id}")),
                            None, None))
            except Exception as exc:
                failed(o.kind, o.sop_instance_uid, ro.SOP_CLASS[o.kind],
                       f"{o.kind.upper()} could not be written: {type(exc).__name__}: {exc}")
        for d in hl7_dests:  # one message per HL7 destination (each names its receiver)
            try:
                out.append(ro.write_hl7(source, result, self.model, objs, d, station=self.config.ae_title, when=when,
                                        path=folder / f"job-{job.id}-{d.name}.hl7"))
            except Exception as exc:
                failed("hl7", ro.hl7_key(source, self.model, d), "ORU^R01",
                       f"the HL7 message could not be made: {type(exc).__name__}: {exc}", d.name)
        if any(o[5] for o in out):
            result["result_objects_error"] = "; ".join(o[5] for o in out if o[5])
        return tuple(out)

    def _finish_all(self, outcomes) -> None:
        """Record a batch of outcomes in one transaction (one fsync), then delete the screened pixels."""
        if not outcomes:
            return
        records = []
        for claim, result, reason, overlay, objects in outcomes:
            if result is not None:
                decision = result.get("decision") or {}
                detail = {"model": result["model"], "label": result.get("label"),
                          "p_covid": (result.get("probabilities") or {}).get("COVID"),
                          "threshold": result.get("threshold"), "borderline": decision.get("borderline"),
                          "operating_point": result["model"]["operating_point"]}
                if objects:
                    detail["objects"] = {kind if only is None else f"{kind}@{only}": uid
                                         for kind, uid, _, _, only, _ in objects}
                if result.get("result_objects_error"):
                    detail["result_objects_error"] = result["result_objects_error"]
                records.append((claim, SCREENED, result, None, overlay, "screened", detail, objects))
            else:
                records.append((claim, FAILED, None, reason, None, "failed", {"reason": reason}, ()))
        kept = self.store.finish_many(records, forget_pixels=not self.config.keep_pixels,
                                      destinations=[(d.name, d.takes) for d in self.config.destinations])
        now = time.time()
        if any(r[7] for r, ok in zip(records, kept) if ok) and self.loop is not None and self.deliver_wake is not None:
            self.loop.call_soon_threadsafe(self.deliver_wake.set)
        for (claim, state, _, _, overlay, _, _, _), ok in zip(records, kept):
            job = claim.job
            if not ok:
                log.warning("job %d: another node took it after this node's claim lapsed; its result is kept, not ours",
                            job.id)
                if overlay:
                    Path(overlay).unlink(missing_ok=True)
                    Path(overlay.replace("-overlay.jpg", "-cam.npy")).unlink(missing_ok=True)
                continue  # (its result objects have the same UIDs and paths as the other node's: nothing to remove)
            self.metrics.jobs.labels(state).inc()
            self.metrics.instance_latency.observe(max(0.0, now - job.received_at))
            if not self.config.keep_pixels and job.path:
                Path(job.path).unlink(missing_ok=True)  # retention: received pixels go, the result stays

    async def _delivery_loop(self) -> None:
        """Send what the outbox holds in batches, up to ``send_concurrency`` associations (or requests) at once;
        woken by committed results, and polling each second for retries coming due and rows a dead sender left.
        Several at once because a PACS answers each C-STORE after its own commit, so one association waits out
        that latency per instance (measured: benchmarks/results/pacs_ingest)."""
        from .outbox import Sending

        assert self.deliver_wake is not None
        cfg = self.config
        names = [d.name for d in cfg.destinations]
        by_name = {d.name: d for d in cfg.destinations}
        inflight: set[asyncio.Task] = set()
        # the longest a batch can take with every timeout running out, and a margin: another node takes over a
        # batch only after this (this node's own come back through release_own at its next start)
        lease = cfg.send_timeout_s * (cfg.send_batch + 2) + 60

        pool = DaemonPool(cfg.send_concurrency + 1, "cxr-deliver")  # the sends, and the claim/record calls

        def in_thread(fn):
            return asyncio.wrap_future(pool.submit(fn))

        def wait_s(attempt: int) -> float:
            return delivery.backoff_s(attempt, cfg.send_backoff_s, cfg.send_backoff_max_s)

        async def one(dest, rows, token):
            items = [delivery.Item(r.id, r.sop_class_uid, r.sop_instance_uid, r.path) for r in rows]
            outcomes = await in_thread(lambda: delivery.send(dest, items, calling_ae=cfg.ae_title,
                                                             timeout_s=cfg.send_timeout_s))
            counts = await in_thread(lambda: self.outbox.record(
                Sending(rows, token), outcomes, max_attempts=cfg.send_attempts, wait_s=wait_s,
                permanent=delivery.permanent))
            now = time.time()
            for r, why in zip(rows, outcomes):
                if why is None:
                    self.metrics.delivery_latency.observe(max(0.0, now - r.created_at))
                else:
                    log.warning("delivery of %s %s to %s failed (attempt %d): %s", r.kind, r.sop_instance_uid, dest.name,
                                r.attempts, why)
            for state, n in counts.items():
                if n:
                    self.metrics.deliveries.labels(dest.name, {"pending": "retry"}.get(state, state)).inc(n)

        try:
            while not self.stopping and names:
                if len(inflight) >= cfg.send_concurrency:
                    await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    sending = await in_thread(lambda: self.outbox.claim(cfg.send_batch, lease, cfg.shared_storage, names,
                                                                        cfg.send_attempts))
                except Exception as exc:  # the store is unreachable for a moment: try again
                    log.error("delivery claim failed: %s: %s", type(exc).__name__, exc)
                    sending = None
                if sending is not None:
                    groups: dict[str, list] = {}
                    for r in sending.rows:
                        groups.setdefault(r.destination, []).append(r)
                    for n, rows in groups.items():
                        task = asyncio.create_task(one(by_name[n], rows, sending.token))
                        inflight.add(task)
                        task.add_done_callback(inflight.discard)
                        task.add_done_callback(_log_failure)
                    continue
                self.deliver_wake.clear()
                try:
                    await asyncio.wait_for(self.deliver_wake.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
        finally:  # sends in flight get a moment to finish and be recorded; the rest are due again at the next start
            if inflight:
                await asyncio.wait(list(inflight), timeout=min(10.0, cfg.send_timeout_s))
            for t in inflight:
                t.cancel()
            pool.shutdown()

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
                if self.config.destinations:
                    for state, n in (await loop.run_in_executor(None, self.outbox.counts)).items():
                        self.metrics.outbox.labels(state).set(n)
            except Exception as exc:
                log.error("study completion pass failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(min(1.0, max(0.1, quiet / 4)))
