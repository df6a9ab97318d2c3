"""The gateway's Prometheus metrics, in a registry of their own (serve's style), served on their own HTTP port.

Per model (the run's model name, ``run`` label the run folder's name): series routed, refused, delivered, failed;
a latency histogram from the series' first arrival to its result delivered (p50/p95 by
``histogram_quantile``); instances received (per calling AE), the queue depth (unfinished series and jobs), and
the rolling drift statistics with their alert state (``gateway.drift``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("medlens_gateway_received_instances", "DICOM instances received (C-STORE)",
                                ["calling_aet"], registry=r)
        self.routed = Counter("medlens_gateway_routed_series", "series routed to a run", ["run"], registry=r)
        self.unrouted = Counter("medlens_gateway_unrouted_series", "series that no routing rule matched", registry=r)
        self.refused = Counter("medlens_gateway_refused_series", "series refused by the out-of-profile gate",
                               ["run"], registry=r)
        self.failed = Counter("medlens_gateway_failed_jobs", "jobs that failed (error, or delivery given up)",
                              ["run"], registry=r)
        self.delivered = Counter("medlens_gateway_delivered_series", "series whose results every destination "
                                 "confirmed", ["run"], registry=r)
        self.latency = Histogram("medlens_gateway_arrival_to_delivery_seconds", "from a series' first instance "
                                 "received to its results delivered", ["run"], buckets=LATENCY_BUCKETS, registry=r)
        self.drift = Gauge("medlens_gateway_drift", "rolling drift of a run's inputs (histogram) and outputs "
                           "(probabilities) against training/test: input_psi, input_ks, output_psi, output_ks",
                           ["run", "stat"], registry=r)
        self.drift_alert = Gauge("medlens_gateway_drift_alert", "1 while a drift statistic is past its threshold",
                                 ["run", "stat"], registry=r)
        self.depth = Gauge("medlens_gateway_queue_depth", "series receiving plus jobs not finished", registry=r)

    def serve(self, host: str, port: int):
        """Start the /metrics HTTP endpoint in a daemon thread; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
