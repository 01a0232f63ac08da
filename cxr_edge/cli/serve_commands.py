"""Commands that serve artifacts: serve (HTTP + kiosk), export-triton, serve-triton."""

from __future__ import annotations

import argparse
import logging

from ._common import (
    HelpFormatter,
    add_engine_args,
    comma_list,
    csv_text,
    default_of,
    non_negative_int,
    positive_float,
    positive_int,
)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TRITON_KINDS = ("auto", "KIND_CPU", "KIND_GPU")


def cmd_kiosk(a) -> int:
    import shlex

    from ..serve.kiosk_launcher import KioskConfig, Supervisor

    cfg = KioskConfig(port=a.port, browser=a.browser, mode=a.mode, serve_args=tuple(shlex.split(a.serve_args or "")),
                      status_file=a.status_file, max_restarts=a.max_restarts)
    return Supervisor(a.artifact, cfg).run()  # checked whole by preflight.resolve_args


def serve_config(a):
    """The service settings from the flags `serve` and `node` share."""
    from ..serve.app import ServeConfig, default_engine_threads

    threads = a.threads or default_engine_threads(a.artifact)
    return ServeConfig(max_batch=a.max_batch, max_delay_ms=a.max_delay_ms, max_queue=a.max_queue, timeout_s=a.timeout,
                       max_body_mb=a.max_body_mb, device=a.device, backend=a.backend, threads=threads,
                       cors_origins=a.cors or (), trusted_keys=tuple(a.trusted_key or ()),
                       body_timeout_s=a.body_timeout, save_dir=a.save_dir, engine_spin=a.engine_spin,
                       cuda_graph=a.cuda_graph, decode_workers=a.decode_workers, decode_timeout_s=a.decode_timeout,
                       decode_memory_mb=a.decode_memory_mb, max_inflight_body_mb=a.max_inflight_body_mb,
                       min_body_rate_kbs=a.min_body_rate_kbs, allow_failed_gate=a.allow_failed_gate, self_check=a.self_check,
                       preprocess=a.preprocess, tuning=a.tuning)


def transport_limits(a):
    from ..serve.http_guard import TransportLimits

    return TransportLimits(header_timeout_s=a.header_timeout, max_connections=a.max_connections,
                           max_pending_headers=a.max_pending_headers, write_timeout_s=a.write_timeout,
                           max_unsent_bytes=int(a.max_unsent_mb * 1024 * 1024))


def warn_if_exposed(host: str) -> None:
    if host not in LOCAL_HOSTS:
        logging.getLogger("cxr_edge.serve").warning(
            "binding to %s: the service has no authentication; put it behind the clinic's reverse proxy", host)


def cmd_serve(a) -> None:
    from ..serve.app import create_app
    from ..serve.http_guard import run_server
    from . import preflight

    preflight.port_free(a.host, a.port)
    warn_if_exposed(a.host)
    run_server(create_app(a.artifact, serve_config(a)), a.host, a.port, limits=transport_limits(a),
               graceful_timeout_s=a.timeout)


def cmd_export_triton(a) -> None:
    from ..export.triton import TritonConfig, export_triton

    cfg = TritonConfig(max_batch_size=a.max_batch, preferred_batch_sizes=a.preferred, max_queue_delay_us=a.delay_us,
                       instances=a.instances, kind=a.kind)
    for d in export_triton(a.artifacts, a.out, cfg):
        print(f"{d}: config.pbtxt validated against Triton's ModelConfig")


def cmd_serve_triton(a) -> None:
    from ..serve.triton_server import serve_triton

    serve_triton(a.artifact, a.host, a.http_port, a.grpc_port, a.metrics_port, a.max_batch, a.delay_us, a.name)


def register(sub) -> None:
    _add_serve_parser(sub)
    _add_kiosk_parser(sub)
    _add_export_triton_parser(sub)
    _add_serve_triton_parser(sub)


def _add_serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="HTTP screening service with dynamic batching and a kiosk page",
                        formatter_class=HelpFormatter)
    sv.add_argument("artifact", help="an artifact with its manifest")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (localhost only unless told otherwise)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port")
    add_service_args(sv)
    sv.set_defaults(func=cmd_serve)


def add_service_args(sv) -> None:
    """The engine, batching, decode and transport flags of the HTTP service (serve, node)."""
    from ..runtime.backends.registry import all_backends
    from ..serve.config import ServeConfig
    from ..serve.http_guard import TransportLimits

    S = ServeConfig
    TL = TransportLimits
    sv.add_argument("--max-batch", type=positive_int, default=default_of(S, "max_batch"), help="images per engine call")
    sv.add_argument("--max-delay-ms", type=float, default=default_of(S, "max_delay_ms"),
                    help="longest wait for a batch to fill")
    sv.add_argument("--max-queue", type=positive_int, default=default_of(S, "max_queue"),
                    help="images waiting before 503 + Retry-After")
    sv.add_argument("--timeout", type=positive_float, default=default_of(S, "timeout_s"),
                    help="per-request timeout and graceful-shutdown drain (s)")
    sv.add_argument("--max-body-mb", type=positive_float, default=default_of(S, "max_body_mb"), help="request body limit")
    add_engine_args(sv, all_backends(), device_default=default_of(S, "device"),
                    preprocess_default=default_of(S, "preprocess"), failed_gate="serve",
                    tuning_default="auto")  # a long-running service: tuning once at first start pays off
    sv.add_argument("--cors", type=comma_list(), help="comma-separated allowed origins (default: none)")
    sv.add_argument("--threads", type=positive_int,
                    help="engine threads (default: all usable cores for models over 1 GMAC/image, half of them "
                         "for lighter ones, whose requests cost more decoding than inference)")
    sv.add_argument("--engine-spin", action=argparse.BooleanOptionalAction, default=False,
                    help="let ONNX Runtime threads busy-wait between calls (spinning took ~25%% "
                         "more CPU per request from the decoders on 2 cores)")
    sv.add_argument("--trusted-key", action="append", metavar="PUB",
                    help="only serve an artifact signed by this Ed25519 public key (repeatable)")
    sv.add_argument("--body-timeout", type=positive_float, default=default_of(S, "body_timeout_s"),
                    help="seconds for a request body to arrive (408)")
    sv.add_argument("--header-timeout", type=positive_float, default=default_of(TL, "header_timeout_s"),
                    help="seconds for request headers to arrive before the connection is closed")
    sv.add_argument("--max-connections", type=positive_int, default=default_of(TL, "max_connections"),
                    help="connections with a request in progress before answering 503 (sockets still sending "
                         "headers do not count: see --max-pending-headers)")
    sv.add_argument("--max-pending-headers", type=positive_int, default=default_of(TL, "max_pending_headers"),
                    help="connections still sending headers; beyond it the oldest is closed")
    sv.add_argument("--write-timeout", type=positive_float, default=default_of(TL, "write_timeout_s"),
                    help="seconds a response may make no progress (a client not reading) before it is dropped")
    sv.add_argument("--max-unsent-mb", type=positive_float, default=default_of(TL, "max_unsent_bytes") / 2**20,
                    help="response bytes waiting for slow readers, all connections together; beyond it the "
                         "longest-stalled connections are dropped")
    sv.add_argument("--decode-workers", type=non_negative_int, default=default_of(S, "decode_workers"),
                    help="decoder processes, each image under --decode-timeout and --decode-memory-mb "
                         "(0: decode in threads of the server, without those limits)")
    sv.add_argument("--decode-timeout", type=positive_float, default=default_of(S, "decode_timeout_s"),
                    help="seconds one image may take to decode before it is stopped and answered as a bad image")
    sv.add_argument("--decode-memory-mb", type=positive_int, default=default_of(S, "decode_memory_mb"),
                    help="memory ceiling of each decoder process above its own footprint")
    sv.add_argument("--max-inflight-body-mb", type=positive_float, default=default_of(S, "max_inflight_body_mb"),
                    help="request bodies held at once by all clients together (503 above)")
    sv.add_argument("--min-body-rate-kbs", type=positive_float, default=default_of(S, "min_body_rate_kbs"),
                    help="slowest accepted upload, over the time the server waits for it, "
                         "after its first 2 s of waiting (kB/s; 408 below)")
    sv.add_argument("--save-dir", help="keep received images under this directory (default: nothing is written)")
    sv.add_argument("--cuda-graph", action="store_true",
                    help="TensorRT engines: capture each batch size once as a CUDA graph and replay it")


def _add_kiosk_parser(sub) -> None:
    from ..serve.kiosk_launcher import KioskConfig

    K = KioskConfig
    ki = sub.add_parser("kiosk", help="the service on localhost plus a Chromium kiosk window on its page, kept running",
                        formatter_class=HelpFormatter,
                        description="Starts `cxr-edge serve` on 127.0.0.1 and Chromium in kiosk (full screen) or app mode "
                                    "with a private profile; restarts either if it exits; stops both on SIGTERM. Works "
                                    "offline. A systemd unit example: docs/kiosk/cxr-edge-kiosk.service.")
    ki.add_argument("artifact", help="an artifact with its manifest")
    ki.add_argument("--port", type=positive_int, default=default_of(K, "port"), help="local port of the service")
    ki.add_argument("--mode", choices=("kiosk", "app", "headless"), default=default_of(K, "mode"),
                    help="kiosk: full screen; app: a window; headless: no display (checks, tests)")
    ki.add_argument("--browser", help="Chromium executable (default: chromium, chromium-browser or google-chrome)")
    ki.add_argument("--serve-args", help="extra `cxr-edge serve` flags, quoted, e.g. \"--trusted-key op.pub\"")
    ki.add_argument("--status-file", help="write the children's pids and restart counts here (JSON)")
    ki.add_argument("--max-restarts", type=positive_int, default=default_of(K, "max_restarts"),
                    help="restarts per child before giving up")
    ki.set_defaults(func=cmd_kiosk)


def _add_export_triton_parser(sub) -> None:
    from ..export.triton import TritonConfig

    T = TritonConfig
    tx = sub.add_parser("export-triton", help="write a Triton model repository from artifacts",
                        formatter_class=HelpFormatter)
    tx.add_argument("artifacts", nargs="+", help="exported artifacts (ONNX or TensorRT plans)")
    tx.add_argument("--out", required=True, help="model repository directory")
    tx.add_argument("--max-batch", type=positive_int, default=default_of(T, "max_batch_size"), help="max_batch_size")
    tx.add_argument("--preferred", type=comma_list(item=positive_int),
                    default=csv_text(default_of(T, "preferred_batch_sizes")), help="preferred batch sizes")
    tx.add_argument("--delay-us", type=int, default=default_of(T, "max_queue_delay_us"),
                    help="max queue delay (microseconds)")
    tx.add_argument("--instances", type=positive_int, default=default_of(T, "instances"), help="model instances")
    tx.add_argument("--kind", default=default_of(T, "kind"), choices=TRITON_KINDS,
                    help="instance kind (auto: GPU for TensorRT plans, CPU otherwise)")
    tx.set_defaults(func=cmd_export_triton)


def _add_serve_triton_parser(sub) -> None:
    import inspect

    from ..serve.triton_server import serve_triton

    st_defaults = {k: v.default for k, v in inspect.signature(serve_triton).parameters.items()}
    st = sub.add_parser("serve-triton", help="serve an artifact inside Triton Inference Server (PyTriton)",
                        formatter_class=HelpFormatter)
    st.add_argument("artifact", help="an artifact with its manifest")
    st.add_argument("--host", default=st_defaults["host"], help="bind address")
    st.add_argument("--http-port", type=int, default=st_defaults["http_port"], help="HTTP port")
    st.add_argument("--grpc-port", type=int, default=st_defaults["grpc_port"], help="gRPC port")
    st.add_argument("--metrics-port", type=int, default=st_defaults["metrics_port"], help="Prometheus port")
    st.add_argument("--max-batch", type=positive_int, default=st_defaults["max_batch"], help="max batch size")
    st.add_argument("--delay-us", type=int, default=st_defaults["max_delay_us"], help="max queue delay (microseconds)")
    st.add_argument("--name", help="model name (default: cxr_<recipe>_<precision>)")
    st.set_defaults(func=cmd_serve_triton)
