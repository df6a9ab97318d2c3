"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("medlens_requests", "HTTP requests by route template and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("medlens_request_seconds", "request latency by route template", ["route"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120),
                                 registry=self.registry)
        self.batch_size = Histogram("medlens_batch_size", "inputs per model call (micro-batching)", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.rejected = Counter("medlens_rejected", "requests refused because the model queue was full",
                                ["model"], registry=self.registry)
        self.pending = Gauge("medlens_pending_requests", "requests in progress per model", ["model"],
                             registry=self.registry)
