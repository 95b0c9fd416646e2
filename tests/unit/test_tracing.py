"""Trace context from a FastAPI request, through publish() and the relay, to the
consumer's span (OpenTelemetry's SDK with its in-memory exporter; SQLite and the
in-memory broker stand in for PostgreSQL and Kafka: tests/integration/test_tracing.py
runs the same chain on the real servers)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.orm import Session, sessionmaker

from outbox import Event, IdempotentConsumer, Outbox
from outbox.consumer import ConsumerRunner
from outbox.errors import InvalidHeader
from outbox.schema import metadata
from outbox.testing import InMemoryBroker, InMemoryPublisher, drain
from tests.unit.consumer_kit import (
    Counter,
    Kit,
    events,
    kit,  # noqa: F401  (fixture)
    run_until,
)

EXPORTER = InMemorySpanExporter()


def tracer_provider() -> None:
    """The SDK's provider, exporting to EXPORTER (the API takes one per process)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    tracer_provider()
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


def named(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


class Recorder(IdempotentConsumer):
    topics = ["orders"]
    group_id = "projections"

    def __init__(self) -> None:
        self.seen: list[Event] = []

    def handle(self, event: Event, session: Session) -> None:
        self.seen.append(event)


def orders_app(engine: sa.Engine, topic: str = "orders") -> FastAPI:
    """A FastAPI service whose endpoint writes an event in its transaction."""
    factory = sessionmaker(engine)
    outbox = Outbox()
    app = FastAPI()

    @app.post("/orders/{order_id}")
    def place(order_id: int) -> dict[str, Any]:
        with factory.begin() as session:
            event = outbox.publish(session, topic=topic, key=str(order_id),
                                   type="OrderPlaced", payload={"id": order_id})
        return {"event": str(event.id)}

    FastAPIInstrumentor.instrument_app(app)
    return app


def test_one_trace_from_the_request_to_the_consumer(tmp_path: Path,
                                                    spans: InMemorySpanExporter) -> None:
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    reply = TestClient(orders_app(engine)).post("/orders/7")
    assert reply.status_code == 200
    event_id = reply.json()["event"]
    server = next(s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER)
    assert server.context is not None

    broker = InMemoryBroker()
    assert drain(url, broker.publisher()) == 1
    consumer = Recorder()
    runner = ConsumerRunner(consumer, db_url=url, source=broker.source("projections"),
                            dead_letters=broker.publisher())
    try:
        run_until(runner, lambda: len(consumer.seen) == 1, "the event")
    finally:
        runner.close()
    # the event carried the request's context
    headers = dict(consumer.seen[0].headers)
    assert f"{server.context.trace_id:032x}" in str(headers["traceparent"])

    [send] = named(spans, "send orders")
    assert send.kind == trace.SpanKind.PRODUCER
    assert [link.context.span_id for link in send.links] == [server.context.span_id]
    assert send.attributes is not None
    assert send.attributes["messaging.batch.message_count"] == 1

    [process] = named(spans, "process orders")
    assert process.kind == trace.SpanKind.CONSUMER
    assert process.context is not None and process.parent is not None
    assert process.context.trace_id == server.context.trace_id  # one trace
    assert process.parent.span_id == server.context.span_id
    assert dict(process.attributes or {}) == {
        "messaging.system": "kafka", "messaging.operation.type": "process",
        "messaging.operation.name": "process", "messaging.destination.name": "orders",
        "messaging.destination.partition.id": "0", "messaging.message.id": event_id,
        "messaging.consumer.group.name": "projections", "outbox.outcome": "applied"}


def test_each_outcome_is_on_its_span(kit: Kit,  # noqa: F811
                                     spans: InMemorySpanExporter) -> None:
    """applied, duplicate, retried, then dead_lettered; `redone` for the fast path's
    rolled-back attempt (the batch is applied again under new spans)."""

    def boom(event: Event) -> None:
        if event.payload == {"i": 1}:
            raise RuntimeError("no")

    [ok, bad] = events("t", 2, keys=1)
    kit.broker.produce_event(ok)
    kit.broker.produce_event(bad)
    kit.broker.produce_event(ok)  # a copy: a duplicate
    consumer = Counter(fail=boom, max_attempts=2)
    runner = kit.runner(consumer)

    def outcomes() -> list[tuple[str, Any]]:
        return [(str(s.attributes["messaging.message.id"]), s.attributes["outbox.outcome"])
                for s in named(spans, "process t") if s.attributes]

    run_until(runner, lambda: (str(ok.id), "duplicate") in outcomes(), "the duplicate")
    assert len(kit.broker.records("t.dlq")) == 1
    outcomes = outcomes()
    assert (str(ok.id), "applied") in outcomes
    assert (str(bad.id), "retried") in outcomes
    assert (str(bad.id), "dead_lettered") in outcomes
    assert (str(ok.id), "redone") in outcomes  # applied on the fast path, rolled back
    assert outcomes.count((str(ok.id), "applied")) == 1
    assert outcomes.count((str(ok.id), "duplicate")) == 1
    failed = [s for s in named(spans, "process t") if s.attributes
              and s.attributes["outbox.outcome"] in ("retried", "dead_lettered")]
    assert all(s.status.status_code == trace.StatusCode.ERROR for s in failed)


def test_without_opentelemetry_nothing_is_imported(tmp_path: Path) -> None:
    """The core does without the `otel` extra: publish, drain and consume work, no
    trace headers are added, and no opentelemetry module is loaded."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["opentelemetry"] = None  # as if the extra were not installed
        import sqlalchemy as sa
        from sqlalchemy.orm import sessionmaker
        from outbox import Outbox
        from outbox.schema import metadata
        from outbox.testing import InMemoryPublisher, drain

        url = "sqlite:///{tmp_path / 'plain.db'}"
        engine = sa.create_engine(url)
        metadata.create_all(engine)
        with sessionmaker(engine).begin() as session:
            Outbox().publish(session, topic="t", key="k", type="T", payload=1)
        publisher = InMemoryPublisher()
        assert drain(url, publisher) == 1
        names = [name for name, _ in publisher.records[0].headers]
        assert "traceparent" not in names, names
        loaded = [m for m, v in sys.modules.items()
                  if m.startswith("opentelemetry") and v is not None]
        assert not loaded, loaded
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


class ExternalCounter(Counter):
    external = True  # one transaction per event, its dedupe record after the effect


def test_an_external_consumer_has_the_same_outcomes(kit: Kit,  # noqa: F811
                                                    spans: InMemorySpanExporter) -> None:
    def boom(event: Event) -> None:
        if event.payload == {"i": 1}:
            raise RuntimeError("no")

    [ok, bad] = events("t", 2, keys=1)
    for event in (ok, bad, ok):
        kit.broker.produce_event(event)
    runner = kit.runner(ExternalCounter(fail=boom, max_attempts=2))

    def outcomes() -> list[tuple[str, Any]]:
        return [(str(s.attributes["messaging.message.id"]), s.attributes["outbox.outcome"])
                for s in named(spans, "process t") if s.attributes]

    run_until(runner, lambda: (str(ok.id), "duplicate") in outcomes(), "the duplicate")
    assert sorted(outcomes()) == sorted([
        (str(ok.id), "applied"), (str(bad.id), "retried"), (str(bad.id), "dead_lettered"),
        (str(ok.id), "duplicate")])


def test_no_current_span_adds_nothing_and_the_callers_own_context_wins(
        tmp_path: Path, spans: InMemorySpanExporter) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'own.db'}")
    metadata.create_all(engine)
    factory, box = sessionmaker(engine), Outbox()
    with factory.begin() as session:  # no span is current
        box.publish(session, topic="t", key="a", type="T", payload=1)
    mine = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    with trace.get_tracer("test").start_as_current_span("request"), \
            factory.begin() as session:
        box.publish(session, topic="t", key="b", type="T", payload=1,
                    headers={"traceparent": mine})
        with pytest.raises(InvalidHeader):  # checked as without a span: a mapping only
            box.publish(session, topic="t", key="c", type="T", payload=1,
                        headers=[("a", "b")])  # type: ignore[arg-type]
    publisher = InMemoryPublisher()
    assert drain(f"sqlite:///{tmp_path / 'own.db'}", publisher) == 2
    first, second = (dict(r.headers) for r in publisher.records)
    assert "traceparent" not in first
    assert second["traceparent"] == mine.encode()
