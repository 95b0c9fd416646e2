"""Prometheus metrics and a health endpoint, on an optional port.

prometheus-client is an optional dependency (`pip install transactional-outbox[metrics]`);
without it, or without a port, the counters below do nothing.
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


def serve(port: int, registry: Any, healthy: Any) -> ThreadingHTTPServer:
    """Serve /metrics (Prometheus text) and /healthz (200 while `healthy()` is true)."""
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

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="outbox-metrics").start()
    return server
