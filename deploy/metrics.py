"""Serving metrics as Ray metrics: every node's Ray metrics agent exports them for Prometheus.

Scrape ``http://NODE:METRICS_PORT/metrics`` on every node (``ray start --metrics-export-port=8080``
fixes the port; Ray also writes a file-based service-discovery list to
``/tmp/ray/prom_metrics_service_discovery.json``). Ray prefixes each name with ``ray_`` and adds the
Serve tags ``application``, ``deployment`` and ``replica``:

- ``ray_pedx_serve_requests_total{endpoint, status}``: requests the gateway answered, by route and HTTP
  status (requests refused by the Serve proxy for overload are in Ray's own
  ``ray_serve_num_http_error_requests_total``);
- ``ray_pedx_serve_request_latency_seconds{endpoint}``: gateway latency histogram;
- ``ray_pedx_serve_batch_size{model}`` and ``ray_pedx_serve_batch_latency_seconds{model}``: the dynamic
  batches a model ran and how long each took;
- ``ray_pedx_serve_gate_total{task, decision}``: the view gate's decisions (``deploy.gate``);
- ``ray_pedx_serve_model_load_seconds{model}``: time to load the checkpoint, one observation per replica
  start (a histogram: Ray stops exporting gauges that are not updated).
Ray's exported histogram ``_sum`` is an estimate; the bucket counts are exact.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

LATENCY_BOUNDARIES = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]
BATCH_BOUNDARIES = [1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5, 128.5]  # bucket i holds sizes up to 2**i
LOAD_BOUNDARIES = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]


class GatewayMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "pedx_serve_requests_total",
            description="HTTP requests answered by the PedX-Ray gateway, by route and status.",
            tag_keys=("endpoint", "status"),
        )
        self.latency = Histogram(
            "pedx_serve_request_latency_seconds",
            description="Gateway request latency (upload read, preprocessing, inference, response).",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("endpoint",),
        )

        self.gate_decisions = Counter(
            "pedx_serve_gate_total",
            description="View-gate decisions per task: accepted, refused (wrong_view), bypassed (gate=off), "
            "unavailable (no view model, or off in the settings), low_confidence (bone-age SD too large).",
            tag_keys=("task", "decision"),
        )

    def gate(self, task: str, decision: str) -> None:
        self.gate_decisions.inc(tags={"task": task, "decision": decision})

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        self.latency.observe(seconds, tags={"endpoint": endpoint})


class ModelMetrics:
    def __init__(self, model: str) -> None:
        self.tags = {"model": model}
        self.batch_size = Histogram(
            "pedx_serve_batch_size",
            description="Images per dynamic batch.",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("model",),
        )
        self.batch_latency = Histogram(
            "pedx_serve_batch_latency_seconds",
            description="Model time per batch.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        # A histogram, not a gauge: Ray stops exporting a gauge that is not set again for a while,
        # and this is observed once per replica start.
        self.load_seconds = Histogram(
            "pedx_serve_model_load_seconds",
            description="Seconds a replica took to load its checkpoint (one observation per start).",
            boundaries=LOAD_BOUNDARIES,
            tag_keys=("model",),
        )

    def loaded(self, seconds: float) -> None:
        self.load_seconds.observe(seconds, tags=self.tags)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size, tags=self.tags)
        self.batch_latency.observe(seconds, tags=self.tags)
