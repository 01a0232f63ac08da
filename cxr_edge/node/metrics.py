"""The node's Prometheus metrics, in the service's own registry (one /metrics for HTTP and DICOM)."""

from __future__ import annotations

from ..extras import require

#: arrival-to-result seconds: a screened image in well under a second, a study after its quiet period
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60, 120, 300)


class NodeMetrics:
    def __init__(self, registry):
        prom = require("prometheus_client")
        r = registry
        self.instances = prom.Counter("cxr_node_instances_total", "Instances received by C-STORE or STOW-RS, by outcome "
                                      "(received = queued for screening, skipped, duplicate, refused)", ["outcome"],
                                      registry=r)
        self.jobs = prom.Counter("cxr_node_jobs_total", "Jobs finished, by outcome (screened, failed)", ["outcome"],
                                 registry=r)
        self.queue = prom.Gauge("cxr_node_queue_depth", "Jobs received and not yet screened (this store, all nodes)",
                                registry=r)
        self.in_flight = prom.Gauge("cxr_node_screening", "Jobs this node is screening now", registry=r)
        self.instance_latency = prom.Histogram("cxr_node_arrival_to_result_seconds",
                                               "Instance arrival to its committed screening result", registry=r,
                                               buckets=LATENCY_BUCKETS)
        self.study_latency = prom.Histogram("cxr_node_study_arrival_to_result_seconds",
                                            "Study first arrival to its completed result (includes the quiet period "
                                            "that decides a study is complete)", registry=r, buckets=LATENCY_BUCKETS)
        self.associations = prom.Counter("cxr_node_associations_total", "DICOM associations, by outcome "
                                         "(accepted, rejected)", ["outcome"], registry=r)
        self.echoes = prom.Counter("cxr_node_echoes_total", "C-ECHO requests answered", registry=r)
        self.outbox = prom.Gauge("cxr_node_outbox_objects", "Result objects in the outbox, by state (pending, sending, "
                                 "delivered, dead = dead-lettered after the last attempt)", ["state"], registry=r)
        self.deliveries = prom.Counter("cxr_node_deliveries_total", "Result object send outcomes, by destination and "
                                       "outcome (delivered, retry, dead)", ["destination", "outcome"], registry=r)
        self.objects_failed = prom.Counter("cxr_node_result_objects_failed_total", "Result objects (SR, SC, SEG, HL7) "
                                           "that could not be made: dead-lettered at once, with the reason", registry=r)
        self.delivery_latency = prom.Histogram("cxr_node_result_to_delivered_seconds", "Result committed to the object "
                                               "held by the destination (retries and outages included)", registry=r,
                                               buckets=LATENCY_BUCKETS)
