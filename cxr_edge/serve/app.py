"""The screening HTTP service (FastAPI).

Endpoints: ``POST /v1/predict``, ``POST /v1/explain`` (adds a Grad-CAM overlay), ``GET /healthz``,
``GET /readyz``, ``GET /metrics`` (Prometheus), ``GET /`` (kiosk page), OpenAPI at ``/docs``.
Images arrive as multipart files or as a raw body; no file-system path is ever accepted from a client.
Nothing a client sends is written to disk.
"""


import asyncio
import base64
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..decision import decide
from ..decode import DecodeLimits
from ..errors import ImageError
from ..extras import require
from ..preprocess import pack_source
from ..runtime.backends.registry import open_backend
from .batcher import DynamicBatcher, QueueFull, ShuttingDown
from .http_guard import BodyGuard
from .metrics import ServiceMetrics

log = logging.getLogger("cxr_edge.serve")


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256
    timeout_s: float = 30.0
    max_body_mb: float = 64.0
    max_images_per_request: int = 16
    decode_workers: int = 4
    device: str = "auto"
    backend: str | None = None
    threads: int | None = None  # engine intra-op threads (default: the engine's own choice)
    engine_spin: bool | None = None  # False: engine threads sleep between calls instead of busy-waiting
    cors_origins: tuple[str, ...] = ()  # closed unless the operator lists origins
    trusted_keys: tuple[str, ...] = ()  # public keys; when given, only artifacts they signed are served
    body_timeout_s: float = 30.0  # a body still arriving after this is answered 408 (slow uploads)
    save_dir: str | None = None  # operator opt-in: keep received images here (never elsewhere, never by default)
    cuda_graph: bool = False  # TensorRT engines: replay each batch size's kernels as one CUDA graph


def create_app(artifact: str | Path, config: ServeConfig = ServeConfig(), engine_wrapper=None):
    """The ASGI app. ``engine_wrapper`` (engine -> engine) wraps the loaded backend: for embedding, and
    for the fault-injection tests that make an engine raise or stall under load."""
    fastapi = require("fastapi")
    from starlette.formparsers import MultiPartParser

    # Starlette spools multipart files over 1 MB to a temporary file on disk. Nothing a patient's image
    # passes through may touch the disk unless the operator asked (save_dir), so keep uploads up to
    # the body limit in memory: the body limit already bounds that memory.
    max_body = int(config.max_body_mb * 1024 * 1024)
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_body + 1)
    save_dir = Path(config.save_dir).resolve() if config.save_dir else None
    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    state: dict = {"ready": False}
    metrics = ServiceMetrics()
    decode_pool = ThreadPoolExecutor(max_workers=config.decode_workers, thread_name_prefix="decode")
    limits = DecodeLimits(max_bytes=int(config.max_body_mb * 1024 * 1024))

    async def lifespan(app):
        opts = {"threads": config.threads} if config.threads else {}
        opts["max_batch"] = config.max_batch
        if config.cuda_graph:
            opts["cuda_graph"] = True
        if config.engine_spin is not None:
            opts["spin"] = config.engine_spin
        engine = open_backend(artifact, backend=config.backend, device=config.device,
                              trusted_keys=list(config.trusted_keys) or None, **opts).load()
        if engine_wrapper is not None:
            engine = engine_wrapper(engine)
        state["engine"] = engine
        state["batcher"] = DynamicBatcher(engine, config.max_batch, config.max_delay_ms, config.max_queue, metrics)
        await state["batcher"].start()
        # warm up before declaring readiness: the first inference allocates and tunes kernels
        await state["batcher"].submit(np.zeros(engine.spec.input_shape, np.uint8), features=True)
        head = None
        if "features" in engine.outputs and engine.artifact is not None:
            from ..runtime.head import load_artifact_head

            head = load_artifact_head(engine.artifact, engine.manifest)
        state["head"] = head
        state["ready"] = True
        log.info("ready: %s on %s/%s (%s)", Path(artifact).name, engine.info.backend, engine.info.provider, engine.info.precision)
        yield
        state["ready"] = False
        await state["batcher"].stop(config.timeout_s)
        engine.close()
        decode_pool.shutdown(wait=False)

    app = fastapi.FastAPI(title="cxr-edge screening service", version="1", lifespan=lifespan,
                          description="Chest X-ray screening: COVID-19 / Normal / Viral Pneumonia with Grad-CAM.")
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"])

    def _decode(data: bytes, name: str, rid: str, k: int):
        if save_dir is not None:
            _save_upload(save_dir, data, rid, k)
        packed, img = pack_source(data, state["engine"].spec, name=name, limits=limits)
        return packed, img.pixels

    async def _images(request: Request) -> list[tuple[str, bytes]]:
        from starlette.exceptions import HTTPException

        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=config.max_images_per_request)
            except HTTPException as exc:
                if "Too many files" in str(exc.detail):
                    raise HTTPException(413, f"at most {config.max_images_per_request} images per request") from exc
                raise
            uploads = [v for _, v in form.multi_items() if hasattr(v, "read")]
            return [(u.filename or f"upload{i}", await u.read()) for i, u in enumerate(uploads)]
        body = await request.body()
        return [("body", body)] if body else []

    async def _screen(request: Request, explain: bool, endpoint: str):
        rid = _request_id(request.headers.get("x-request-id"))
        t0 = time.perf_counter()
        if not state["ready"]:
            metrics.requests.labels(endpoint, "503").inc()
            return JSONResponse({"detail": "model is loading", "request_id": rid}, 503, headers={"Retry-After": "2"})
        items = await _images(request)
        if not items:
            metrics.requests.labels(endpoint, "400").inc()
            return JSONResponse({"detail": "no image in the request: send multipart field 'files' or a raw image body",
                                 "request_id": rid}, 400)
        if len(items) > config.max_images_per_request:
            metrics.requests.labels(endpoint, "413").inc()
            return JSONResponse({"detail": f"at most {config.max_images_per_request} images per request",
                                 "request_id": rid}, 413)
        engine, batcher = state["engine"], state["batcher"]
        if explain and state["head"] is None:
            return JSONResponse({"detail": "engine-native Grad-CAM is not available for this artifact", "request_id": rid}, 501)
        loop = asyncio.get_running_loop()

        async def one(k, name, data):
            t = time.perf_counter()
            batcher.expect()
            try:
                packed, original = await loop.run_in_executor(decode_pool, _decode, data, name, rid, k)
            except BaseException as exc:
                batcher.arrived()
                if not isinstance(exc, ImageError):
                    raise
                metrics.images.labels("bad_image").inc()
                return {"index": k, "filename": name, "ok": False, "status": 422, "error": exc.reason}
            decode_ms = 1e3 * (time.perf_counter() - t)
            t = time.perf_counter()
            out = await asyncio.wait_for(batcher.enqueue(packed, features=explain, announced=True), config.timeout_s)
            probs = out["probs"][None]
            label = int(decide(probs, engine.classes, threshold)[0])
            res = {"index": k, "filename": name, "ok": True, "label": engine.classes[label],
                   "probabilities": {c: float(p) for c, p in zip(engine.classes, probs[0])}, "threshold": threshold,
                   "timings_ms": {"decode": decode_ms, "queue_and_infer": 1e3 * (time.perf_counter() - t)}}
            if explain:
                t = time.perf_counter()
                png, peak = await loop.run_in_executor(decode_pool, _overlay_png, original, out["features"], label)
                res["gradcam"] = {"overlay_png_base64": png, "peak": peak, "target": engine.classes[label],
                                  "method": "engine-native"}
                res["timings_ms"]["explain"] = 1e3 * (time.perf_counter() - t)
            metrics.images.labels("ok").inc()
            return res

        threshold = engine.manifest.threshold
        try:
            results = await asyncio.gather(*(one(k, n, d) for k, (n, d) in enumerate(items)))
        except QueueFull:
            metrics.requests.labels(endpoint, "503").inc()
            return JSONResponse({"detail": "queue full, retry shortly", "request_id": rid}, 503, headers={"Retry-After": "1"})
        except ShuttingDown:
            metrics.requests.labels(endpoint, "503").inc()
            return JSONResponse({"detail": "shutting down", "request_id": rid}, 503, headers={"Retry-After": "5"})
        except asyncio.TimeoutError:
            metrics.requests.labels(endpoint, "504").inc()
            return JSONResponse({"detail": f"no answer within {config.timeout_s} s", "request_id": rid}, 504)
        except Exception as exc:  # engine failure: this request fails, the service stays up
            log.exception("request %s failed", rid)
            metrics.requests.labels(endpoint, "500").inc()
            return JSONResponse({"detail": f"inference failed: {type(exc).__name__}", "request_id": rid}, 500)
        status = 200 if any(r["ok"] for r in results) else 422
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        info = engine.info
        log.info("request %s: %d image(s), status %d, %.1f ms", rid, len(items), status, 1e3 * (time.perf_counter() - t0))
        return JSONResponse({"request_id": rid, "results": results,
                             "model": {"backend": info.backend, "provider": info.provider, "precision": info.precision,
                                       "classes": engine.classes}}, status)

    def _overlay_png(original, features, label):
        import cv2

        from ..runtime.gradcam import gradcam
        from ..runtime.overlay import overlay

        cam = gradcam(state["head"], features[None], label).cam[0]
        ok, buf = cv2.imencode(".png", overlay(original, cam))
        return base64.b64encode(buf.tobytes()).decode(), float(cam.max())

    body_doc = {"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/v1/predict", summary="Screen one or more images (multipart 'files', or one raw image body)",
              openapi_extra=body_doc)
    async def predict(request: Request):
        return await _screen(request, False, "predict")

    @app.post("/v1/explain", summary="Screen and add Grad-CAM overlays (PNG, base64)", openapi_extra=body_doc)
    async def explain(request: Request):
        return await _screen(request, True, "explain")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return JSONResponse({"ready": False}, 503)
        info = state["engine"].info
        return {"ready": True, "backend": info.backend, "provider": info.provider, "precision": info.precision,
                "queue_depth": state["batcher"].depth()}

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def kiosk():
        return resources.files("cxr_edge.serve").joinpath("kiosk.html").read_text()

    app.state.cxr = state
    app.state.metrics = metrics
    return BodyGuard(app, max_body, config.body_timeout_s)


#: below this many multiply-accumulates per image, decoding costs a CPU service more than inference
LIGHT_MODEL_GMACS = 1.0


def default_engine_threads(artifact: str | Path, cores: int | None = None) -> int | None:
    """Engine threads for serving on the CPU: all cores for heavy models, half for light ones.

    Measured on 2 cores with the load test at concurrency 32: the small CNN (0.24 GMAC/image, decode
    and HTTP dominate) served 178 req/s with 1 engine thread vs 158 with 2; ResNet50 (3.9 GMAC/image,
    inference dominates) 82 req/s with 2 threads vs 62 with 1. None (the engine's own default) when
    the cost cannot be read (non-ONNX artifacts, remote models).
    """
    cores = cores or len(os.sched_getaffinity(0))
    if not str(artifact).endswith(".onnx"):
        return None
    try:
        from ..graph_macs import macs_per_image

        gmacs = macs_per_image(artifact) / 1e9
    except Exception:  # an unreadable graph: let the engine decide
        return None
    return max(1, cores // 2) if gmacs < LIGHT_MODEL_GMACS else cores


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
