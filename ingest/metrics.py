"""Prometheus metrics of an ingest run (prometheus-client), served with ``--metrics-port``.

One registry per run, so tests and several runs in one process never collide on metric names.
Rates are exported as counters (``rate(pedx_ingest_bytes_retrieved_total[1m])`` in Prometheus)
plus gauges of the run's average, for a glance at ``/metrics`` without a Prometheus server.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class IngestMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.found = Counter("pedx_ingest_instances_found", "SOP instances found by C-FIND", registry=r)
        self.retrieved = Counter(
            "pedx_ingest_instances_retrieved", "SOP instances stored in the spool", registry=r
        )
        self.skipped = Counter(
            "pedx_ingest_instances_already_present",
            "SOP instances already in the spool (resumed run)",
            registry=r,
        )
        self.failed = Counter(
            "pedx_ingest_instances_failed",
            "Instances that failed, by stage and reason",
            ["stage", "reason"],
            registry=r,
        )
        self.bytes = Counter("pedx_ingest_bytes_retrieved", "Bytes stored in the spool", registry=r)
        self.cataloged = Counter(
            "pedx_ingest_instances_cataloged", "Catalog rows by status", ["status"], registry=r
        )
        self.per_class = Gauge(
            "pedx_ingest_class_instances",
            "Labelled instances per class",
            ["granularity", "label"],
            registry=r,
        )
        self.unmapped = Gauge(
            "pedx_ingest_unmapped_instances",
            "Unmapped instances by body part header",
            ["body_part"],
            registry=r,
        )
        self.images_per_second = Gauge(
            "pedx_ingest_images_per_second", "Average retrieval rate of this run", registry=r
        )
        self.bytes_per_second = Gauge(
            "pedx_ingest_bytes_per_second", "Average retrieval bandwidth of this run", registry=r
        )
        self.stage = Gauge("pedx_ingest_stage_info", "1 for the stage running now", ["stage"], registry=r)
        self._started = time.monotonic()
        self._stored = self._stored_bytes = 0

    def serve(self, port: int, addr: str = "127.0.0.1"):
        """Expose /metrics on ``addr:port``; returns the server (call .shutdown() to stop)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server

    def set_stage(self, name: str) -> None:
        for stage in ("find", "retrieve", "scan", "shards", "done"):
            self.stage.labels(stage).set(1 if stage == name else 0)

    # RetrieveObserver protocol (ingest.dicom.scu)
    def on_found(self, n: int) -> None:
        self.found.inc(n)

    def on_stored(self, nbytes: int) -> None:
        self.retrieved.inc()
        self.bytes.inc(nbytes)
        self._stored += 1
        self._stored_bytes += nbytes
        elapsed = max(time.monotonic() - self._started, 1e-6)
        self.images_per_second.set(self._stored / elapsed)
        self.bytes_per_second.set(self._stored_bytes / elapsed)

    def on_skipped(self, n: int) -> None:
        self.skipped.inc(n)

    def on_failed(self, reason: str, stage: str = "retrieve") -> None:
        self.failed.labels(stage, reason.split(":")[0][:40]).inc()

    def record_catalog(self, catalog) -> None:
        """Counts from a catalog DataFrame: rows by status, per-class counts, unmapped by body part."""
        for status, n in catalog["status"].value_counts().items():
            self.cataloged.labels(str(status)).inc(int(n))
        ok = catalog[catalog["status"] == "ok"]
        for granularity in (7, 30, 68):
            for label, n in ok[f"label_{granularity}"].value_counts().items():
                self.per_class.labels(str(granularity), str(label)).set(int(n))
        unmapped = catalog[catalog["status"] == "unmapped"]
        for body_part, n in unmapped["body_part"].astype("string").fillna("(missing)").value_counts().items():
            self.unmapped.labels(str(body_part)).set(int(n))
