"""Prometheus metrics, per model and version, in a registry owned by one server (no module globals)."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kiln.server.batcher import BatchInfo

_LABELS = ("model", "version")
LAG_INTERVAL_S = 0.05
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.request_success = Counter("kiln_request_success", "Inference requests answered 200", _LABELS, registry=r)
        self.request_failure = Counter("kiln_request_failure", "Inference requests that failed, by reason",
                                       (*_LABELS, "reason"), registry=r)
        self.inference_count = Counter("kiln_inference_count", "Rows (items) inferred", _LABELS, registry=r)
        self.execution_count = Counter("kiln_execution_count", "Model executions (batches); inference/execution "
                                       "is the average batch size", _LABELS, registry=r)
        self.request_latency = Histogram("kiln_request_duration_seconds", "Request latency, receive to answer",
                                         _LABELS, buckets=_BUCKETS, registry=r)
        self.queue_latency = Histogram("kiln_queue_duration_seconds", "Time a request waited for its batch",
                                       _LABELS, buckets=_BUCKETS, registry=r)
        self.compute_latency = Histogram("kiln_compute_duration_seconds", "Time one batch took to run",
                                         _LABELS, buckets=_BUCKETS, registry=r)
        self.batch_size = Histogram("kiln_batch_size", "Rows per execution", _LABELS,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue_depth = Gauge("kiln_queue_depth", "Requests waiting for a batch", _LABELS, registry=r)
        self.in_flight = Gauge("kiln_in_flight", "Requests queued or running", _LABELS, registry=r)
        self.loop_lag = Histogram("kiln_event_loop_lag_seconds", "How late the server's event loop woke up from a "
                                  f"{LAG_INTERVAL_S * 1e3:.0f} ms sleep: a stall here delays every request",
                                  buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0), registry=r)
        self.shadow_samples = Counter("kiln_shadow_samples", "Requests drift watch compared with the fp32 reference",
                                      ("model",), registry=r)
        self.shadow_dropped = Counter("kiln_shadow_dropped", "Sampled requests drift watch dropped (its queue was full)",
                                      ("model",), registry=r)
        self.fidelity = Gauge("kiln_fidelity", "Served variant against the fp32 reference over recent sampled requests "
                              "(metric: cosine, top1_agreement, row_cosine_mean, max_rel_err ...)",
                              ("model", "output", "metric"), registry=r)
        self.rejections = Counter("kiln_rejections", "Requests refused before running (queue full, expired, shutting down)",
                                  (*_LABELS, "reason"), registry=r)

    def track(self, model: Any) -> None:
        """Start exporting a served model's queue depth and requests in flight (its own, or its replicas')."""
        self.queue_depth.labels(model.name, model.version).set_function(model.queue_depth)
        self.in_flight.labels(model.name, model.version).set_function(model.in_flight)

    def observe_batch(self, model: Any, info: BatchInfo) -> None:
        labels = (model.name, model.version)
        self.execution_count.labels(*labels).inc()
        self.inference_count.labels(*labels).inc(info.rows)
        self.compute_latency.labels(*labels).observe(info.compute_s)
        self.batch_size.labels(*labels).observe(info.rows)
        q = self.queue_latency.labels(*labels)
        for s in info.queue_s:
            q.observe(s)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def watch_loop_lag(self) -> None:
        """Run for the server's lifetime: sleep LAG_INTERVAL_S, record how late the loop woke up."""
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(LAG_INTERVAL_S)
            self.loop_lag.observe(max(0.0, loop.time() - t0 - LAG_INTERVAL_S))
