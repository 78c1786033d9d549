"""Prometheus metrics of one replica, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

# Seconds; inference on a small CPU model is milliseconds, a cold or loaded replica seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Seconds a call waits in a batched handler's queue: usually below its max_wait_ms.
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
# Rows per model call of a batched handler (max_batch_size is at most 4096).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ReplicaMetrics:
    """requests_total{handler,status}, request_seconds{handler}, in_flight, ready, draining;
    for batched handlers batch_rows{handler}, queue_seconds{handler}, shed_total{handler}."""

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
        self.draining = Gauge(
            "anycast_draining",
            "1 once the replica was told to stop and finishes the calls it holds.",
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "anycast_batch_rows",
            "Rows per model call of a batched handler.",
            ["handler"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "anycast_queue_seconds",
            "Time a call waited in a batched handler's queue before its model call began.",
            ["handler"],
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.shed = Counter(
            "anycast_shed",
            "Calls of a batched handler answered 503 because they could not meet their deadline.",
            ["handler"],
            registry=self.registry,
        )

    def observe(self, handler: str, status: int, seconds: float) -> None:
        self.requests.labels(handler, str(status)).inc()
        self.latency.labels(handler).observe(seconds)

    def observe_batch(self, handler: str, rows: int, waits: list[float]) -> None:
        """One model call of ``rows`` rows; ``waits`` holds each gathered call's queue time."""
        self.batch_rows.labels(handler).observe(rows)
        queue = self.queue_seconds.labels(handler)
        for seconds in waits:
            queue.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
