"""One trace from a FastAPI request, through publish(), the relay and Kafka's headers, to
the consumer's span, on the real PostgreSQL and Kafka, with each client and mode."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from outbox.consumer import ConsumerRunner
from outbox.exactly_once import namespace
from outbox.progress import KafkaProgressLog, progress_topic
from outbox.publisher import KafkaSettings, make_publisher
from outbox.relay import Relay, RelayConfig
from outbox.txn import make_txn_producer
from tests.integration.test_relay import pending
from tests.unit.test_tracing import Recorder, named, orders_app, spans  # noqa: F401

MODES = [("kafka-python", False), ("confluent", False), ("kafka-python", True)]


def relay(db_url: str, kafka: str, client: str, exactly_once: bool) -> Relay:
    settings = KafkaSettings(kafka)
    extra: dict[str, Any] = {}
    if exactly_once:
        extra = {"transactions": lambda tid: make_txn_producer(client, settings, tid, 5000),
                 "progress": KafkaProgressLog(settings,
                                              progress_topic(namespace(db_url, "outbox")))}
    return Relay(RelayConfig(db_url=db_url, exactly_once=exactly_once, lease_seconds=5,
                             relay_id="traced"),
                 lambda: make_publisher(client, settings), **extra)


@pytest.mark.parametrize(("client", "exactly_once"), MODES)
def test_one_trace_from_the_request_to_the_consumer(
        engine: sa.Engine, db_url: str, kafka_bootstrap: str,
        new_topic: Callable[..., str], spans: InMemorySpanExporter,  # noqa: F811
        client: str, exactly_once: bool) -> None:
    topic = new_topic(partitions=1)
    reply = TestClient(orders_app(engine, topic)).post("/orders/7")
    assert reply.status_code == 200
    server = next(s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER)
    assert server.context is not None

    worker = relay(db_url, kafka_bootstrap, client, exactly_once)
    try:
        deadline = time.monotonic() + 60
        while pending(engine) and time.monotonic() < deadline:
            worker.step(wait=False)
        assert pending(engine) == 0
    finally:
        worker.stop()
        worker._close()

    consumer = Recorder()
    consumer.topics = [topic]
    runner = ConsumerRunner(consumer, db_url=db_url, kafka=kafka_bootstrap,
                            session_timeout_ms=6000)
    try:
        deadline = time.monotonic() + 60
        while not consumer.seen and time.monotonic() < deadline:
            runner.run_once(0.5)
    finally:
        runner.close()
    assert len(consumer.seen) == 1

    [send] = named(spans, f"send {topic}")
    assert [link.context.span_id for link in send.links] == [server.context.span_id]
    [process] = named(spans, f"process {topic}")
    assert process.context is not None and process.parent is not None
    assert process.context.trace_id == server.context.trace_id
    assert process.parent.span_id == server.context.span_id
    assert process.attributes is not None
    assert process.attributes["messaging.message.id"] == reply.json()["event"]
    assert process.attributes["outbox.outcome"] == "applied"
