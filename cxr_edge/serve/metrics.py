"""Prometheus metrics of one service instance (its own registry, so several apps can coexist in tests)."""

from __future__ import annotations

from ..extras import require


class ServiceMetrics:
    def __init__(self):
        prom = require("prometheus_client")
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("cxr_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.images = prom.Counter("cxr_images_total", "Images by outcome", ["outcome"], registry=r)
        self.queue_depth = prom.Gauge("cxr_queue_depth", "Images waiting for the engine", registry=r)
        self.batch_size = prom.Histogram("cxr_batch_size", "Images per engine batch",
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.inference_seconds = prom.Histogram("cxr_inference_seconds", "Engine time per batch",
                                                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                                registry=r)
        self.latency = prom.Histogram("cxr_request_seconds", "Request latency", ["endpoint"],
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)

        self.decode_backlog = prom.Gauge("cxr_decode_backlog", "Images being decoded or waiting for a decoder",
                                         registry=r)
        self.decode_killed = prom.Gauge("cxr_decode_workers_replaced",
                                        "Decode workers killed and replaced (deadline, memory ceiling, crash)", registry=r)

        self.preprocess_on_gpu = prom.Gauge("cxr_preprocess_on_gpu",
                                            "1 when images are resized on the GPU, 0 on the CPU", registry=r)
        self.tuned = prom.Gauge("cxr_engine_tuning", "1 for the engine configuration in use and where it came from "
                                "(cxr-edge tune's measured winner on this machine, or the default)", ["choice"], registry=r)

        self.pending_headers = prom.Gauge("cxr_connections_pending_headers",
                                          "Connections still sending request headers or idle between requests",
                                          registry=r)
        self.unsent_bytes = prom.Gauge("cxr_unsent_response_bytes",
                                       "Response bytes waiting for clients that read slowly (all connections)",
                                       registry=r)
        self.transport_events = prom.Gauge("cxr_transport_guard_events", "Connections the transport guards acted on, "
                                           "by event, since start", ["event"], registry=r)

    def transport(self, snapshot: dict) -> None:
        """Copy the transport guards' state (serve.http_guard.transport_snapshot) into the gauges."""
        self.pending_headers.set(snapshot["pending_headers"])
        self.unsent_bytes.set(snapshot["unsent_response_bytes"])
        for event, n in snapshot["events"].items():
            self.transport_events.labels(event).set(n)

    def render(self) -> bytes:
        return require("prometheus_client").generate_latest(self.registry)
