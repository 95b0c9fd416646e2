"""The relay's Prometheus metrics and health endpoint."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.metrics import RelayMetrics, serve
from outbox.publisher import InMemoryPublisher
from outbox.relay import Relay, RelayConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_count_published_events_and_health_follows_the_session(
    engine: sa.Engine, db_url: str
) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        for i in range(7):
            box.publish(s, topic="t", key=f"k{i}", type="T", payload={})
    registry = CollectorRegistry()
    relay = Relay(RelayConfig(db_url=db_url), InMemoryPublisher, RelayMetrics(registry))
    port = free_port()
    server = serve(port, registry, relay.healthy)
    try:
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 503  # no session yet
        while relay.step(wait=False):
            pass
        status, body = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert "outbox_relay_published_total 7.0" in body
        assert "outbox_relay_owned_shards 16.0" in body
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        relay._drop_connection()
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 503
    finally:
        server.shutdown()
