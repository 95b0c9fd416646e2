"""Our consumer applies records relayed by Debezium's Outbox Event Router exactly once.

docs/debezium.md maps the outbox table onto the router (`table.field.event.id=event_id`,
`table.field.event.key=key`, `table.field.event.payload=payload`, `route.by.field=topic`,
the value passed through as bytes). Kafka Connect is not part of the test stack, so the
records are produced here in the shape that configuration gives, from the rows our
writer committed: value = the `payload` column's bytes, key = the `key` column, and an
`id` header with the `event_id` column as text -- no `ce_*` headers. Each record is
produced twice, as a connector restarted from an older offset would.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from outbox import Event, IdempotentConsumer, Outbox
from outbox.consumer import ConsumerRunner
from tests.integration.consumer_app import COUNTER_DDL, bump
from tests.integration.test_consumer import (
    RawRecord,
    counters,
    inbox_ids,
    make_runner,
    produce,
    run_until,
)

KEYS = 5
EVENTS = 40


@pytest.fixture
def debezium_runners() -> Iterator[list[ConsumerRunner]]:
    made: list[ConsumerRunner] = []
    yield made
    for r in made:
        r.close()


def write_events(engine: sa.Engine, topic: str) -> list[dict[str, Any]]:
    """Commit events through the real writer; return the outbox rows Debezium would read."""
    box = Outbox()
    with engine.begin() as c:
        c.execute(sa.text(COUNTER_DDL))
    sessions = sessionmaker(engine)
    for i in range(EVENTS):
        with sessions() as session, session.begin():
            box.publish(session, topic=topic, key=f"order-{i % KEYS}", type="OrderPlaced",
                        payload={"i": i, "amount": Decimal("9.99")})
    with engine.connect() as c:
        rows = c.execute(sa.text(
            "SELECT event_id, topic, key, type, payload, content_type FROM outbox_events "
            "WHERE topic = :t ORDER BY position"), {"t": topic}).mappings().all()
    assert len(rows) == EVENTS
    return [dict(r) for r in rows]


def debezium_record(row: dict[str, Any], placed: bool) -> RawRecord:
    """What the router emits for one row: the `id` header, plus, with
    `table.fields.additional.placement=type:header:ce_type,content_type:header:content-type`,
    those two headers (SimpleHeaderConverter writes text columns as UTF-8 text)."""
    headers = [("id", str(row["event_id"]).encode())]
    if placed:
        headers += [("ce_type", row["type"].encode()),
                    ("content-type", row["content_type"].encode())]
    return row["key"].encode(), bytes(row["payload"]), headers


@pytest.mark.parametrize("placed", [False, True], ids=["id-header-only", "type-placed"])
def test_debezium_records_twice_each_are_applied_exactly_once(
    placed: bool, engine: sa.Engine, db_url: str, kafka_bootstrap: str,
    new_topic: Callable[..., str], debezium_runners: list[ConsumerRunner]
) -> None:
    topic = new_topic(3)
    rows = write_events(engine, topic)
    records = [debezium_record(r, placed) for r in rows]
    if not placed:  # the router's default shape: no CloudEvents header at all
        assert {name for _, _, hs in records for name, _ in hs} == {"id"}
    produce(kafka_bootstrap, topic, records + records)  # every record delivered twice
    handled: list[Event] = []

    class Projector(IdempotentConsumer):
        topics = (topic,)
        group_id = "debezium-projector"
        id_header = "id"  # Debezium's header for table.field.event.id

        def handle(self, event: Event, session: Session) -> None:
            handled.append(event)
            bump(session, event)

    runner = make_runner(debezium_runners, Projector(), db_url, kafka_bootstrap)
    run_until(runner, lambda: runner.stats.processed + runner.stats.duplicates
              + runner.stats.dead_lettered >= 2 * EVENTS, f"{2 * EVENTS} records finished")
    assert runner.stats.dead_lettered == 0, "Debezium's records were refused as malformed"
    assert (runner.stats.processed, runner.stats.duplicates) == (EVENTS, EVENTS)
    ids = {uuid.UUID(str(r["event_id"])) for r in rows}
    # the id the consumer deduplicates on is the outbox's own event id, not a derived one
    assert counters(engine) == {i: 1 for i in ids}
    assert inbox_ids(engine, "debezium-projector") == ids
    by_id = {r["event_id"]: r for r in rows}
    for event in handled:
        row = by_id[event.id]
        assert (event.topic, event.key) == (topic, row["key"])
        assert event.data == bytes(row["payload"])
        assert event.payload == json.loads(bytes(row["payload"]))
        assert event.payload["amount"] == "9.99"
        assert event.type == ("OrderPlaced" if placed else "")
    # per key, first deliveries in commit (= position) order, as with our relay
    for k in range(KEYS):
        key = f"order-{k}"
        want = [r["event_id"] for r in rows if r["key"] == key]
        got = [e.id for e in handled if e.key == key]
        assert got == want


def test_a_consumer_left_on_ce_id_dead_letters_debezium_records_naming_the_header(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str,
    new_topic: Callable[..., str], debezium_runners: list[ConsumerRunner]
) -> None:
    """Why `id_header = "id"` is needed: without it the id is not found, and the record is
    parked on the dead-letter topic with a reason, never applied without deduplication."""
    topic = new_topic(1)
    rows = write_events(engine, topic)[:3]
    produce(kafka_bootstrap, topic, [debezium_record(r, False) for r in rows])

    class Default(IdempotentConsumer):
        topics = (topic,)
        group_id = "debezium-default"

        def handle(self, event: Event, session: Session) -> None:
            bump(session, event)

    runner = make_runner(debezium_runners, Default(), db_url, kafka_bootstrap)
    run_until(runner, lambda: runner.stats.malformed == 3, "3 records dead-lettered")
    assert runner.stats.processed == 0 and counters(engine) == {}
