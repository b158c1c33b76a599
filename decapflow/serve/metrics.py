"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, queue_depth: Callable[[], float], loaded_banks: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("decapflow_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("decapflow_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("decapflow_batch_size", "Images per captioning batch", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.images = Counter("decapflow_images_total", "Images captioned", registry=self.registry)
        depth = Gauge("decapflow_queue_depth", "Images waiting for a batch", registry=self.registry)
        depth.set_function(queue_depth)
        loaded = Gauge("decapflow_loaded_banks", "Memory banks loaded in memory", registry=self.registry)
        loaded.set_function(loaded_banks)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
