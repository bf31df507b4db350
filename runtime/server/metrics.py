"""`GET /metrics`: the server's counters in Prometheus' text format (prometheus_client, one registry per app).

    pulse_edge_requests_total{endpoint, outcome}       outcome: ok, bad_request, unauthorized, queue_full, ...
    pulse_edge_request_duration_seconds{endpoint}      arrival to last byte, queueing included
    pulse_edge_queue_depth / pulse_edge_generating     requests waiting for the model / 1 while it generates
    pulse_edge_queue_wait_seconds                      arrival at the queue to the model thread picking it up
    pulse_edge_time_to_first_token_seconds             preprocess + vision + prefill (the runtime's own timing)
    pulse_edge_decode_tokens_per_second                decode rate of each generation
    pulse_edge_generations_total{stop_reason}          eos, max_new_tokens, context_full, cancelled
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: a tiny test bundle answers in well under a second, the 7B on a 2-core CPU needs minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, waiting: Callable[[], int], busy: Callable[[], bool]) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("pulse_edge_requests", "HTTP requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=registry)
        self.duration = Histogram("pulse_edge_request_duration_seconds", "Request arrival to last byte sent",
                                  ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        Gauge("pulse_edge_queue_depth", "Requests waiting for the model (not the one generating)",
              registry=registry).set_function(waiting)
        Gauge("pulse_edge_generating", "1 while the model is generating",
              registry=registry).set_function(lambda: float(busy()))
        self.queue_wait = Histogram("pulse_edge_queue_wait_seconds", "Submission to the model thread starting it",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("pulse_edge_time_to_first_token_seconds",
                              "Preprocess, vision and prefill of one generation", buckets=LATENCY_BUCKETS,
                              registry=registry)
        self.decode_rate = Histogram("pulse_edge_decode_tokens_per_second", "Decode rate of one generation",
                                     buckets=RATE_BUCKETS, registry=registry)
        self.generations = Counter("pulse_edge_generations", "Finished generations by stop reason",
                                   ["stop_reason"], registry=registry)

    def generation(self, stop_reason: str, timings: Mapping[str, Any]) -> None:
        """Record one finished generation from its `timings` (GenerationResult.timings as a dict)."""
        self.generations.labels(stop_reason).inc()
        self.ttft.observe(timings["time_to_first_token_ms"] / 1e3)
        if timings["decode_tokens_per_s"] > 0:
            self.decode_rate.observe(timings["decode_tokens_per_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
