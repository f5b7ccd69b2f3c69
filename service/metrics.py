"""Prometheus metrics. One registry per app (tests run several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

MODEL_STATES = ["loading", "ready", "failed"]
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("vqtok_http_requests_total", "HTTP requests answered", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram(
            "vqtok_http_request_duration_seconds", "time from request start to response end", ["route"], buckets=_LATENCY, registry=r
        )
        self.in_flight = Gauge("vqtok_http_requests_in_flight", "HTTP requests being served", registry=r)
        self.queue_seconds = Histogram(
            "vqtok_queue_wait_seconds", "time a request waited in the batcher queue", ["model", "op"], buckets=_LATENCY, registry=r
        )
        self.inference_seconds = Histogram(
            "vqtok_inference_seconds", "time of one batched inference call", ["model", "op"], buckets=_LATENCY, registry=r
        )
        self.batch_size = Histogram("vqtok_batch_size", "images per inference call", ["model", "op"], buckets=_BATCH, registry=r)
        self.infer_message_requests = Histogram(
            "vqtok_infer_message_requests",
            "requests per infer message the inference process received (a split server's front groups those of one event-loop turn)",
            ["model", "op"],
            buckets=_BATCH,
            registry=r,
        )
        self.shared_memory_used = Gauge(
            "vqtok_shared_memory_used_bytes", "bytes of the fronts' shared-memory slabs held by requests in flight", registry=r
        )
        self.queue_depth = Gauge("vqtok_queue_depth", "images waiting in the batcher queue", ["model"], registry=r)
        self.images = Counter("vqtok_images_total", "images processed", ["model", "op"], registry=r)
        self.tokens = Counter("vqtok_tokens_total", "token ids produced (encode) or consumed (decode)", ["model", "op"], registry=r)
        self.rejected = Counter(
            "vqtok_rejected_total", "requests refused or dropped by the batcher", ["model", "reason"], registry=r
        )  # reason: queue_full, too_large, deadline, cancelled
        self.batch_failures = Counter("vqtok_batch_failures_total", "inference calls that raised", ["model", "op"], registry=r)
        self.model_state = Enum("vqtok_model_state", "model lifecycle state", ["model"], states=MODEL_STATES, registry=r)
        self.reloads = Counter("vqtok_model_reloads_total", "reload attempts", ["model", "result"], registry=r)
        self.model_runtime = Gauge(
            "vqtok_model_runtime_info",
            "the runtime serving each model (1 for the serving version)",
            ["model", "runtime", "device", "precision"],
            registry=r,
        )
