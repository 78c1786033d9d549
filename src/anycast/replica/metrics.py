"""Prometheus metrics of one replica, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

# Seconds; inference on a small CPU model is milliseconds, a cold or loaded replica seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ReplicaMetrics:
    """requests_total{handler,status}, request_seconds{handler}, in_flight, ready."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "anycast_requests",
            "Handler calls by handler and HTTP status.",
            ["handler", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "anycast_request_seconds",
            "Time from request to response, by handler.",
            ["handler"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "anycast_in_flight", "Handler calls being served now.", registry=self.registry
        )
        self.ready = Gauge(
            "anycast_ready", "1 once setup() has finished, else 0.", registry=self.registry
        )

    def observe(self, handler: str, status: int, seconds: float) -> None:
        self.requests.labels(handler, str(status)).inc()
        self.latency.labels(handler).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
