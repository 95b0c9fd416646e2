"""Prometheus metrics and a health endpoint, on an optional port.

prometheus-client is an optional dependency (`pip install transactional-outbox[metrics]`):
`outbox relay` and `outbox consume` refuse `--metrics-port` without it. Given a registry
of None (no port), the counters below do nothing.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class RelayMetrics:
    """The relay's counters; a registry of None means metrics are off."""

    def __init__(self, registry: Any) -> None:
        self.on = registry is not None
        if not self.on:
            return
        from prometheus_client import Counter, Gauge, Histogram

        kw = {"registry": registry}
        self._published = Counter("outbox_relay_published", "Events acknowledged by Kafka", **kw)
        self._failed = Counter("outbox_relay_failed", "Sends that failed and will retry", **kw)
        self._dead = Counter("outbox_relay_dead_lettered", "Events moved to dead letters", **kw)
        self._latency = Histogram("outbox_relay_batch_seconds", "Claim-to-ack time of a batch",
                                  **kw)
        self._shards = Gauge("outbox_relay_owned_shards", "Shards this relay owns", **kw)
        self._empty = Gauge("outbox_relay_idle", "1 when the last claim found nothing", **kw)

    def batch(self, seconds: float, published: int) -> None:
        if self.on:
            self._latency.observe(seconds)
            self._published.inc(published)
            self._empty.set(0)

    def failed(self) -> None:
        if self.on:
            self._failed.inc()

    def dead_lettered(self) -> None:
        if self.on:
            self._dead.inc()

    def shards(self, n: int) -> None:
        if self.on:
            self._shards.set(n)

    def backlog_empty(self) -> None:
        if self.on:
            self._empty.set(1)


DEFAULT_HOST = "127.0.0.1"


def serve(port: int, registry: Any, healthy: Any, host: str = DEFAULT_HOST
          ) -> ThreadingHTTPServer:
    """Serve /metrics (Prometheus text) and /healthz (200 while `healthy()` is true).

    On loopback unless `host` says otherwise ("0.0.0.0" for a scraper on another host):
    the endpoint has no authentication. Raises OSError if the port cannot be bound.
    """
    from prometheus_client import generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, status, ctype = generate_latest(registry), 200, "text/plain; version=0.0.4"
            elif self.path == "/healthz":
                ok = bool(healthy())
                body, status, ctype = (b"ok\n" if ok else b"unhealthy\n"), (200 if ok else 503), \
                    "text/plain"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="outbox-metrics").start()
    return server


class ConsumerMetrics:
    """The idempotent consumer's counters and lag; a registry of None means metrics are off."""

    def __init__(self, registry: Any) -> None:
        self.on = registry is not None
        if not self.on:
            return
        from prometheus_client import Counter, Gauge, Histogram

        kw = {"registry": registry}
        self._processed = Counter("outbox_consumer_processed",
                                  "Events handled and committed", **kw)
        self._duplicates = Counter("outbox_consumer_duplicates_skipped",
                                   "Redelivered events skipped by their dedupe record", **kw)
        self._failed = Counter("outbox_consumer_failed",
                               "Handler attempts that raised (each retry counts)", **kw)
        self._dead = Counter("outbox_consumer_dead_lettered",
                             "Records sent to the dead-letter topic", ["reason"], **kw)
        self._latency = Histogram("outbox_consumer_batch_seconds",
                                  "Time to apply and commit one poll batch", **kw)
        self._lag = Gauge("outbox_consumer_lag",
                          "Records left per assigned partition (end offset - position)",
                          ["topic", "partition"], **kw)
        self._lag_labels: set[tuple[str, str]] = set()

    def batch(self, seconds: float, processed: int, duplicates: int,
              dead_reasons: list[str]) -> None:
        if self.on:
            self._latency.observe(seconds)
            self._processed.inc(processed)
            self._duplicates.inc(duplicates)
            for reason in dead_reasons:
                self._dead.labels(reason).inc()

    def failed(self) -> None:
        if self.on:
            self._failed.inc()

    def lag(self, lags: dict[tuple[str, int], int]) -> None:
        """Set the lag of the assigned partitions; drop the series of the others."""
        if not self.on:
            return
        current = {(topic, str(p)) for topic, p in lags}
        for labels in self._lag_labels - current:
            self._lag.remove(*labels)
        for (topic, p), n in lags.items():
            self._lag.labels(topic, str(p)).set(n)
        self._lag_labels = current

    def forget(self, topic: str, partition: int) -> None:
        labels = (topic, str(partition))
        if self.on and labels in self._lag_labels:
            self._lag.remove(*labels)
            self._lag_labels.discard(labels)
