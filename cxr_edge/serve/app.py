"""The screening HTTP service (FastAPI).

Endpoints: ``POST /v1/predict``, ``POST /v1/explain`` (adds a Grad-CAM overlay), ``GET /healthz``,
``GET /readyz``, ``GET /metrics`` (Prometheus), ``GET /`` (kiosk page), OpenAPI at ``/docs``.
Images arrive as multipart files or as a raw body; no file-system path is ever accepted from a client.
Nothing a client sends is written to disk unless the operator names a ``save_dir``.
"""

# no `from __future__ import annotations`: FastAPI resolves the route functions' annotations (Request)
import asyncio
import base64
import logging
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..decode import DecodeLimits
from ..decode_workers import DecodeIsolation, IsolatedDecoder, PackedItem, decode_and_pack, error_from
from ..errors import ImageError
from ..extras import require
from ..machine import usable_cores
from ..runtime.backends.registry import open_backend
from ..runtime.result import Explanation, ScreeningResult
from ..runtime.screening_step import ScreeningStep
from .batcher import DynamicBatcher, QueueFull, ShuttingDown
from .config import ServeConfig
from .http_guard import BodyGuard, transport_snapshot
from .metrics import ServiceMetrics

if TYPE_CHECKING:
    from ..runtime.backends.base import Backend, BackendInfo

__all__ = ["ScreeningService", "ServeConfig", "create_app", "default_engine_threads"]

log = logging.getLogger("cxr_edge.serve")

#: base64 bytes of one image's explanation (overlay + preview + map); a noisy preview is halved until it fits,
#: so an explain answer is at most images x this plus its JSON
EXPLAIN_MAX_BYTES = 1536 * 1024


class _Refused(Exception):
    """A request answered with an error status before any image was screened."""

    def __init__(self, status: int, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.status, self.detail, self.retry_after = status, detail, retry_after


class ScreeningService:
    """One loaded artifact behind HTTP: engine, dynamic batcher, decoders, Grad-CAM head and metrics.

    The engine is loaded in the app's lifespan (so the port opens only once the model is warm), and
    every request is screened through :meth:`screen`, which returns one
    :class:`~cxr_edge.runtime.result.ScreeningResult` per image.
    """

    def __init__(self, artifact: "str | Path", config: ServeConfig = ServeConfig(), engine_wrapper=None):
        self.artifact, self.config, self.engine_wrapper = artifact, config, engine_wrapper
        self.engine: Backend | None = None  # loaded by start(), before the service is ready
        self.batcher: DynamicBatcher | None = None
        self.head: object | None = None  # the engine-native Grad-CAM head, or None (no explain)
        self.ready = False
        self.metrics = ServiceMetrics()
        self.stopping = False
        self.preprocess = "cpu"
        self.reduced_decode, self.decode_note = False, "full resolution"  # set from the manifest at load
        self.tuned: str | None = None
        # threads: saving uploads, overlays, and decoding itself when isolation is off (decode_workers=0)
        self.decode_pool = ThreadPoolExecutor(max_workers=max(2, config.decode_workers), thread_name_prefix="decode")
        self.decoder: IsolatedDecoder | None = None
        self.max_body = int(config.max_body_mb * 1024 * 1024)
        self.limits = DecodeLimits(max_bytes=self.max_body)
        #: images being decoded or waiting for a decoder beyond this: requests are refused up front and
        #: /readyz says not ready (a load balancer sends the work elsewhere). As deep as the inference queue: a
        #: shallower backlog refused bursts of honest one-image clients although the queue behind had room; the
        #: request timeout and the fair decode queue bound what waiting costs.
        self.max_decode_backlog = max(8 * max(1, config.decode_workers), config.max_queue)
        self.save_dir = Path(config.save_dir).resolve() if config.save_dir else None
        self._multipart = _in_memory_multipart_parser(self.max_body)

    @property
    def loaded_engine(self) -> "Backend":
        """The engine, for work done once the service is ready (start() loads it first)."""
        assert self.engine is not None, "start() loads the engine before the service is ready"
        return self.engine

    @property
    def engine_info(self) -> "BackendInfo":
        info = self.loaded_engine.info
        assert info is not None, "Backend.load() sets info"
        return info

    @property
    def live_batcher(self) -> DynamicBatcher:
        """The batcher, for work done once the service is ready (start() makes it first)."""
        assert self.batcher is not None, "start() makes the batcher before the service is ready"
        return self.batcher

    # ---- lifecycle
    async def start(self) -> None:
        c = self.config
        opts: dict = {"threads": c.threads} if c.threads else {}
        opts["max_batch"] = c.max_batch
        if c.cuda_graph:
            opts["cuda_graph"] = True
        if c.engine_spin is not None:
            opts["spin"] = c.engine_spin
        from ..runtime.tuning import apply_tuning

        # a service batches: the configuration that measured fastest for batched throughput on this machine
        # (tuned once, at the first start, when the operator named no backend)
        backend, opts, self.tuned = await asyncio.get_running_loop().run_in_executor(
            None, lambda: apply_tuning(self.artifact, c.backend, c.device, opts, "batched", c.tuning))
        if self.tuned:
            log.info("tuned for this machine: %s", self.tuned)
        self.metrics.tuned.labels(choice=self.tuned or "not tuned (default backend)").set(1)
        engine = open_backend(self.artifact, backend=backend, device=c.device, allow_failed_gate=c.allow_failed_gate,
                              trusted_keys=list(c.trusted_keys) or None, self_check=c.self_check, **opts).load()
        try:
            if self.engine_wrapper is not None:
                engine = self.engine_wrapper(engine)
            self.engine = engine
            from ..runtime.screener import choose_preprocess

            self.preprocess, note = choose_preprocess(c.preprocess, engine)
            log.info("preprocessing on the %s (%s)", self.preprocess.upper(), note)
            self.metrics.preprocess_on_gpu.set(1 if self.preprocess == "gpu" else 0)
            self.step = ScreeningStep(engine)  # the same step as Screener: decision, operating point, Grad-CAM
            self.operating_point = self.step.operating_point
            from ..runtime.decode_gate import decode_mode

            self.reduced_decode, self.decode_note = decode_mode(engine.manifest)  # as Screener: only where gated
            if c.decode_workers > 0:
                self.decoder = IsolatedDecoder(engine.spec, self.limits, DecodeIsolation(
                    c.decode_workers, c.decode_timeout_s, c.decode_memory_mb), reduce=self.reduced_decode)
                await asyncio.get_running_loop().run_in_executor(None, self.decoder.warm_up)
            self.batcher = DynamicBatcher(engine, c.max_batch, c.max_delay_ms, c.max_queue, self.metrics)
            await self.batcher.start()
            # warm up before declaring readiness: the first inference allocates and tunes kernels
            await self.batcher.submit(np.zeros(engine.spec.input_shape, np.uint8), features=True)
            self.head = self.step.cam_engine()[1]  # engine-native Grad-CAM head, or None (no explain here)
        except BaseException:
            if self.batcher is not None:
                await self.batcher.stop(0)
            if self.decoder is not None:
                self.decoder.close()
            engine.close()  # a failed start must not keep the engine (GPU memory, threads)
            raise
        self.ready = True
        info = engine.info
        log.info("ready: %s on %s/%s (%s)", Path(str(self.artifact)).name, info.backend, info.provider, info.precision)

    async def stop(self) -> None:
        """Drain: requests already queued for the engine are answered; those still decoding or arriving
        get a JSON 503 with their request id (see :meth:`screen`)."""
        self.ready = False
        self.stopping = True
        if self.batcher is not None:
            await self.batcher.stop(self.config.timeout_s)
        if self.decoder is not None:
            self.decoder.close()
        if self.engine is not None:
            self.engine.close()
        self.decode_pool.shutdown(wait=False)

    def _capacity_for(self, n: int) -> str | None:
        if self.decoder is not None and self.decoder.pending + n > self.max_decode_backlog:
            return f"{self.decoder.pending} images waiting for {self.config.decode_workers} decoders"
        batcher = self.live_batcher
        if batcher.depth() + batcher.incoming + n > self.config.max_queue:
            return "inference queue full"
        return None

    def saturated(self) -> str | None:
        """Why new work should go elsewhere now, or None."""
        if self.decoder is not None and self.decoder.pending >= self.max_decode_backlog:
            return f"{self.decoder.pending} images waiting for {self.config.decode_workers} decoders"
        if self.batcher is not None and self.batcher.depth() + self.batcher.incoming >= self.config.max_queue:
            return "inference queue full"
        return None

    # ---- one request
    async def _images(self, request) -> list[tuple[str, bytes]]:
        from starlette.formparsers import MultiPartException

        ctype = request.headers.get("content-type", "")
        if ctype.lower().startswith("multipart/form-data"):  # media types are case-insensitive (RFC 9110)
            parser = self._multipart(request.headers, request.stream(), max_files=self.config.max_images_per_request,
                                     max_fields=self.config.max_images_per_request)
            try:
                form = await parser.parse()
            except MultiPartException as exc:
                if "Too many files" in exc.message:
                    raise _Refused(413, f"at most {self.config.max_images_per_request} images per request") from exc
                raise _Refused(400, f"malformed multipart body: {exc.message}") from exc
            uploads = [v for _, v in form.multi_items() if hasattr(v, "read")]
            return [(u.filename or f"upload{i}", await u.read()) for i, u in enumerate(uploads)]
        body = await request.body()
        return [("body", body)] if body else []

    async def _decode(self, data: bytes, name: str, rid: str, k: int, explain: bool, client: str = "") -> PackedItem:
        """Decode + pack one upload: in a worker process under the per-image deadline and memory ceiling (the
        workers shared fairly between clients, then requests), or in a thread when isolation is off. Raises the
        item's ImageError."""
        loop = asyncio.get_running_loop()
        if self.save_dir is not None:
            await loop.run_in_executor(self.decode_pool, _save_upload, self.save_dir, data, rid, k)
        item = await asyncio.wrap_future(self.submit_decode(data, name, explain, client, rid))
        return await self.ready_for_engine(item)

    def submit_decode(self, data: bytes, name: str, keep_preview: bool, client: str = "", request: str = "") -> Future:
        """Decode + pack one image, callable from any thread: a future of its PackedItem, or of the item's ImageError.
        In the isolated worker pool (deadline, memory ceiling, fair between clients), or in a thread when isolation is
        off. On the GPU path the image is resized later, on the device (:meth:`ready_for_engine`)."""
        resize = self.preprocess != "gpu"
        if self.decoder is not None:
            return self.decoder.submit(data, name, keep_preview=keep_preview, resize=resize, client=client,
                                       request=request)
        return self.decode_pool.submit(_decode_in_thread, data, name, self.loaded_engine.spec, self.limits, keep_preview,
                                       resize, self.reduced_decode)

    async def ready_for_engine(self, item: PackedItem) -> PackedItem:
        """A decoded item at the engine's input size: resized on the device when preprocessing runs on the GPU."""
        if self.preprocess == "gpu":
            item.packed = await asyncio.get_running_loop().run_in_executor(self.decode_pool, self._gpu_resize,
                                                                           item.packed)
        return item

    def _gpu_resize(self, img: np.ndarray) -> np.ndarray:
        """One decoded image resized on the device (the CPU resize if the device fails: logged, counted)."""
        from ..runtime.resize import area_resize

        engine = self.engine
        assert engine is not None  # requests are screened only once start() loaded it
        spec = engine.spec
        try:
            import cupy as cp

            return cp.asnumpy(area_resize(cp.asarray(img), spec.height, spec.width, cp))
        except Exception as exc:
            log.warning("GPU resize failed (%s: %s); resized on the CPU", type(exc).__name__, exc)
            self.metrics.images.labels("gpu_fallback").inc()
            return area_resize(img, spec.height, spec.width)

    def _render(self, preview: np.ndarray, e: Explanation) -> Explanation:
        """The inline images of an HTTP explanation, from the screening step's Grad-CAM: its overlay, the preview
        and the map alone, at the capped preview size (never the full-resolution image); the kiosk blends preview
        and map with its own opacity control. Together within :data:`EXPLAIN_MAX_BYTES` (base64): a noisy
        preview is sent smaller rather than letting an answer grow to several times its upload. A map with no localised
        evidence (``e.localised`` false) gets no coloured layer at all, and its overlay is the preview in gray."""
        import cv2

        from ..runtime.overlay import heatmap, overlay

        t = time.perf_counter()
        cam = e.cam
        assert cam is not None  # the screening step attaches its map to every explanation
        h, w = preview.shape[:2]
        small = (max(1, w * 256 // max(h, w)), max(1, h * 256 // max(h, w)))  # smooth: the browser scales it up

        def b64(ext: str, img: np.ndarray, *params) -> str:
            ok, buf = cv2.imencode(ext, img, list(params))
            return base64.b64encode(buf.tobytes()).decode()

        e.heatmap_png_base64 = b64(".png", heatmap(cam, small)) if e.localised else None  # nothing for a viewer to blend
        while True:
            e.overlay_png_base64 = b64(".png", overlay(preview, cam))
            e.preview_jpeg_base64 = b64(".jpg", preview, cv2.IMWRITE_JPEG_QUALITY, 90)
            side = max(preview.shape[:2])
            size = len(e.heatmap_png_base64 or "") + len(e.overlay_png_base64) + len(e.preview_jpeg_base64)
            if size <= EXPLAIN_MAX_BYTES or side <= 128:
                break
            preview = cv2.resize(preview, (max(1, preview.shape[1] // 2), max(1, preview.shape[0] // 2)),
                                 interpolation=cv2.INTER_AREA)
        e.seconds += time.perf_counter() - t
        return e

    def _screen_item(self, k: int, name: str, out: dict, timings: dict, explain: bool, preview) -> ScreeningResult:
        """The screening step for one image of a request, then (explain) its inline images."""
        features = out["features"][None] if explain else None
        r = self.step.results([k], [name], out["probs"][None], [timings], self.preprocess, explain, features)[0]
        r.decode = self.decode_note
        if explain and r.explanation is not None:
            r.explanation = self._render(preview, r.explanation)
            r.timings_ms["explain"] = 1e3 * r.explanation.seconds
        return r

    async def _one(self, k: int, name: str, data: bytes, rid: str, explain: bool, deadline: float,
                   client: str = "") -> ScreeningResult:
        """One image: decode, queue, infer, explain, all within the request's deadline (``timeout_s``)."""
        loop = asyncio.get_running_loop()
        batcher = self.live_batcher
        t = time.perf_counter()
        batcher.expect()
        try:
            item = await asyncio.wait_for(self._decode(data, name, rid, k, explain, client), _left(deadline))
        except BaseException as exc:
            batcher.arrived()
            if not isinstance(exc, ImageError):
                raise
            self.metrics.images.labels("bad_image").inc()
            return ScreeningResult.unusable(k, name, exc.reason)
        decode_ms = 1e3 * (time.perf_counter() - t)
        t = time.perf_counter()
        out = await asyncio.wait_for(batcher.enqueue(item.packed, features=explain, announced=True), _left(deadline))
        timings = {"decode": decode_ms, "queue_and_infer": 1e3 * (time.perf_counter() - t)}
        if explain:  # Grad-CAM and image encoding: off the event loop
            r = await loop.run_in_executor(self.decode_pool, self._screen_item, k, name, out, timings, True,
                                           item.preview)
        else:
            r = self._screen_item(k, name, out, timings, False, None)
        self.metrics.images.labels("ok").inc()
        return r

    async def _run_all(self, items, rid: str, explain: bool, deadline: float, client: str = ""):
        """All images of one request; the first failure (queue full, timeout, engine) cancels the
        siblings, so a refused request stops decoding and inferring at once. Returns the results, or
        the exception that ended the request."""
        tasks = [asyncio.create_task(self._one(k, n, d, rid, explain, deadline, client))
                 for k, (n, d) in enumerate(items)]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:  # the server is going away: take the siblings with us
            for t in tasks:
                t.cancel()
            raise
        failed = next((t for t in tasks if t in done and not t.cancelled() and t.exception() is not None), None)
        if failed is None:
            return [t.result() for t in tasks]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return failed.exception()

    async def screen(self, request, explain: bool, endpoint: str):
        from fastapi.responses import JSONResponse, Response
        from starlette.requests import ClientDisconnect

        rid = _request_id(request.headers.get("x-request-id"))
        t0 = time.perf_counter()

        def refuse(status: int, detail: str, retry_after: int | None = None):
            self.metrics.requests.labels(endpoint, str(status)).inc()
            headers = {"Retry-After": str(retry_after)} if retry_after else None
            return JSONResponse({"detail": detail, "request_id": rid}, status, headers=headers)

        if self.stopping:
            return refuse(503, "shutting down", 5)
        if not self.ready:
            return refuse(503, "model is loading", 2)
        deadline = time.monotonic() + self.config.timeout_s  # decoding counts, not only queue and inference
        try:
            items = await self._images(request)
        except _Refused as exc:
            return refuse(exc.status, exc.detail, exc.retry_after)
        except ClientDisconnect:  # the client left mid-upload: nobody to answer, nothing to log as an error
            log.info("request %s: client disconnected during the upload", rid)
            self.metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        if not items:
            return refuse(400, "no image in the request: send multipart field 'files' or a raw image body")
        if len(items) > self.config.max_images_per_request:
            return refuse(413, f"at most {self.config.max_images_per_request} images per request")
        if explain and self.head is None:
            return refuse(501, "engine-native Grad-CAM is not available for this artifact")
        # capacity up front: all of this request's images fit, or none is started
        busy = self._capacity_for(len(items))
        if busy:
            return refuse(503, f"busy ({busy}), retry shortly", 1)
        # the peer address (uvicorn takes it from X-Forwarded-For only when the peer is a trusted proxy)
        client = request.client.host if request.client else ""
        outcome = await self._run_all(items, rid, explain, deadline, client)
        if isinstance(outcome, BaseException):
            if isinstance(outcome, QueueFull):
                return refuse(503, "queue full, retry shortly", 1)
            if isinstance(outcome, ShuttingDown) or self.stopping:
                return refuse(503, "shutting down", 5)
            if isinstance(outcome, asyncio.TimeoutError):
                return refuse(504, f"no answer within {self.config.timeout_s} s")
            log.error("request %s failed: %s: %s", rid, type(outcome).__name__, outcome, exc_info=outcome)
            return refuse(500, f"inference failed: {type(outcome).__name__}")
        results = outcome
        status = 200 if any(r.ok for r in results) else 422
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        log.info("request %s: %d image(s), status %d, %.1f ms", rid, len(items), status, 1e3 * (time.perf_counter() - t0))
        return JSONResponse({"request_id": rid, "results": [r.to_dict() for r in results], "model": self.model_info()},
                            status)

    def model_info(self) -> dict:
        """What the kiosk shows about the model: which file, which version, which precision, which threshold."""
        info, m = self.engine_info, self.loaded_engine.manifest
        created = (m.created or "")[:10]
        return {"backend": info.backend, "provider": info.provider, "precision": info.precision,
                "classes": self.loaded_engine.classes, "artifact": m.file, "recipe": m.recipe,
                "version": f"v{m.revision}" + (f" ({created})" if created else ""),
                "sha256": (m.sha256 or "")[:12] or None, "operating_point": self.operating_point,
                "preprocess": self.preprocess, "tuned": self.tuned,
                "self_check": info.self_check.to_dict() if info.self_check else None}

    # ---- the ASGI app
    def build_app(self, extend=None, on_start=None, on_stop=None):
        """The ASGI app. ``extend(app)`` adds routes before the transport guards wrap it; ``on_start`` and
        ``on_stop`` (coroutine functions) run after the engine is ready and before it is released: the DICOM
        node mounts STOW-RS and its job routes, and starts its SCP and worker, this way."""
        fastapi = require("fastapi")
        from fastapi import Request
        from fastapi.responses import HTMLResponse, JSONResponse, Response

        from .schemas import ErrorResponse, HealthResponse, ModelInfo, ReadyResponse, ScreenResponse

        service = self

        async def lifespan(app):
            await service.start()
            if on_start is not None:
                try:
                    await on_start()
                except BaseException:
                    await service.stop()
                    raise
            yield
            try:
                if on_stop is not None:
                    await on_stop()
            finally:
                await service.stop()

        app = fastapi.FastAPI(title="cxr-edge screening service", version="1", lifespan=lifespan,
                              description="Chest X-ray screening: COVID-19 / Normal / Viral Pneumonia with Grad-CAM.")
        if self.config.cors_origins:
            from fastapi.middleware.cors import CORSMiddleware

            app.add_middleware(CORSMiddleware, allow_origins=list(self.config.cors_origins), allow_methods=["GET", "POST"])

        body_doc = {"requestBody": {"content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
        answers = {200: {"model": ScreenResponse, "description": "at least one image screened (others: per-image 422)"},
                   422: {"model": ScreenResponse, "description": "no image could be used; each result says why"},
                   400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 500: {"model": ErrorResponse},
                   503: {"model": ErrorResponse, "description": "loading, queue full or shutting down (Retry-After)"},
                   504: {"model": ErrorResponse}}

        @app.post("/v1/predict", summary="Screen one or more images (multipart 'files', or one raw image body)",
                  openapi_extra=body_doc, response_model=ScreenResponse, responses=answers)
        async def predict(request: Request):
            return await service.screen(request, False, "predict")

        @app.post("/v1/explain", summary="Screen and add Grad-CAM overlays (PNG, base64)", openapi_extra=body_doc,
                  response_model=ScreenResponse, responses={**answers, 501: {"model": ErrorResponse}})
        async def explain(request: Request):
            return await service.screen(request, True, "explain")

        @app.get("/v1/model", response_model=ModelInfo, responses={503: {"model": ErrorResponse}})
        async def model():
            if not service.ready:
                return JSONResponse({"detail": "model is loading"}, 503)
            return service.model_info()

        @app.get("/healthz", response_model=HealthResponse)
        async def healthz():
            return {"status": "ok"}

        @app.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
        async def readyz():
            if not service.ready:
                return JSONResponse({"ready": False, "reason": "shutting down" if service.stopping else "loading"}, 503)
            busy = service.saturated()
            if busy:
                return JSONResponse({"ready": False, "reason": busy, "queue_depth": service.live_batcher.depth()}, 503)
            info = service.engine_info
            return {"ready": True, "backend": info.backend, "provider": info.provider, "precision": info.precision,
                    "queue_depth": service.live_batcher.depth()}

        @app.get("/metrics", response_class=Response)
        async def prom():
            if service.decoder is not None:
                service.metrics.decode_backlog.set(service.decoder.pending)
                service.metrics.decode_killed.set(service.decoder.killed)
            service.metrics.transport(transport_snapshot())
            return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

        @app.get("/", response_class=HTMLResponse)
        async def kiosk():
            return resources.files("cxr_edge.serve").joinpath("kiosk.html").read_text()

        if extend is not None:
            extend(app)
        app.state.service = service
        app.state.metrics = service.metrics
        return BodyGuard(app, self.max_body, self.config.body_timeout_s,
                         max_inflight_bytes=int(self.config.max_inflight_body_mb * 1024 * 1024),
                         min_rate=self.config.min_body_rate_kbs * 1024)


def create_app(artifact: str | Path, config: ServeConfig = ServeConfig(), engine_wrapper=None):
    """The ASGI app. ``engine_wrapper`` (engine -> engine) wraps the loaded backend: for embedding, and
    for the fault-injection tests that make an engine raise or stall under load."""
    return ScreeningService(artifact, config, engine_wrapper).build_app()


def _in_memory_multipart_parser(max_body: int):
    """Starlette's multipart parser with uploads kept in memory up to the body limit, for this service only.

    Starlette spools multipart files over 1 MB to a temporary file on disk. Nothing a patient's image
    passes through may touch the disk unless the operator asked (save_dir); the body limit already
    bounds the memory. A subclass, not a change to Starlette's class, so other apps in the process
    keep their own behaviour.
    """
    require("python_multipart")  # python-multipart, which Starlette's parser needs
    from starlette.formparsers import MultiPartParser

    return type("InMemoryMultiPartParser", (MultiPartParser,), {"spool_max_size": max_body + 1})


#: below this many multiply-accumulates per image, decoding costs a CPU service more than inference
LIGHT_MODEL_GMACS = 1.0


def default_engine_threads(artifact: str | Path, cores: int | None = None) -> int | None:
    """Engine threads for serving on the CPU: all cores for heavy models, half for light ones.

    Light models are bound by decode and HTTP, so one engine thread leaves cores for them; heavy models are bound
    by inference and want every core. None (the engine's own default) when the cost cannot be read (non-ONNX
    artifacts, remote models).
    """
    cores = cores or usable_cores()
    if not str(artifact).endswith(".onnx"):
        return None
    try:
        from ..graph_macs import macs_per_image

        gmacs = macs_per_image(artifact) / 1e9
    except Exception:  # an unreadable graph: let the engine decide
        return None
    return max(1, cores // 2) if gmacs < LIGHT_MODEL_GMACS else cores


def _decode_in_thread(data: bytes, name: str, spec, limits: DecodeLimits, keep_preview: bool, resize: bool,
                      reduce: bool = False) -> PackedItem:
    res = decode_and_pack(data, name, spec, limits, keep_preview, resize, reduce)
    if res[0] != "ok":
        raise error_from(*res[1:])
    return res[1]


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _request_id(client_value: str | None) -> str:
    """The client's X-Request-ID when it is a plain token (it goes into logs and file names), else a new one."""
    if client_value and len(client_value) <= 64 and all(ch.isalnum() or ch in "-_." for ch in client_value):
        return client_value
    return uuid.uuid4().hex[:12]


def _save_upload(save_dir: Path, data: bytes, rid: str, k: int) -> Path:
    """Keep one received image (operator opt-in): named by request id, never by the client's filename."""
    from ..decode import _sniff_format

    day = time.strftime("%Y%m%d")
    folder = save_dir / day
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rid}-{k}-{uuid.uuid4().hex[:8]}.{_sniff_format(data[:256]) or 'bin'}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path
