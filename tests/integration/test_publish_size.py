"""publish()'s size limit against the real broker, at Kafka's default message.max.bytes.

First the count itself: a record batch of exactly 1048588 bytes by `record_size` (the
broker's default limit) is accepted and one of 1048589 refused. Then publish(): the
largest event it accepts at the default max_event_bytes (1 MiB), read back from
PostgreSQL and sent the way the relay sends it, is accepted; a byte more is refused
by publish() itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Event, Outbox, PayloadTooLarge
from outbox.event import KafkaHeaders, kafka_headers, record_size
from outbox.publisher import PERMANENT_ERRORS, KafkaPublisher, KafkaSettings
from outbox.schema import tables
from outbox.serde import decode_headers

BROKER_DEFAULT = 1048588  # Kafka's default message.max.bytes (1 MiB + 12)


@pytest.fixture
def publisher(kafka_bootstrap: str) -> Iterator[Callable[[], KafkaPublisher]]:
    """KafkaPublishers as the relay makes them (idempotent, acks=all, 16 MiB requests)."""
    made: list[KafkaPublisher] = []

    def make() -> KafkaPublisher:
        made.append(KafkaPublisher(KafkaSettings(bootstrap_servers=kafka_bootstrap)))
        return made[-1]

    yield make
    for p in made:
        p.close()


def send_alone(publisher: KafkaPublisher, topic: str,
               record: tuple[bytes, bytes, KafkaHeaders]) -> BaseException | None:
    """Send one record and wait for the broker's answer: None if it was accepted."""
    delivery = publisher.send(topic, *record)
    publisher.flush(60)
    assert delivery.done(), "the broker did not answer within 60 s"
    return delivery.error()


def record_of_size(target: int) -> tuple[bytes, bytes, KafkaHeaders]:
    """A record with real CloudEvents headers whose batch is exactly `target` bytes."""
    event = Event(topic="t", key="customer-42", type="OrderPlaced", payload=None, data=b"",
                  headers={"tenant": "eu"})
    key, _, headers = event.to_record()
    n = target - record_size(key, b"", headers)
    while record_size(key, b"x" * n, headers) > target:
        n -= 1
    value = b"x" * n
    assert record_size(key, value, headers) == target
    return key, value, headers


def test_the_broker_counts_what_record_size_counts(
    new_topic: Callable[..., str], publisher: Callable[[], KafkaPublisher]
) -> None:
    topic = new_topic(partitions=1)
    assert send_alone(publisher(), topic, record_of_size(BROKER_DEFAULT)) is None
    error = send_alone(publisher(), topic, record_of_size(BROKER_DEFAULT + 1))
    assert error is not None and type(error).__name__ in PERMANENT_ERRORS, repr(error)
    assert "TooLarge" in type(error).__name__


def largest_accepted(box: Outbox, **fields: Any) -> int:
    """The longest JSON string payload publish() accepts (binary search, no database)."""
    lo, hi = 0, box.max_event_bytes
    with Session() as s:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            try:
                box.publish(s, payload="x" * mid, **fields)
            except PayloadTooLarge:
                hi = mid - 1
            else:
                lo = mid
    return lo


def test_an_event_publish_accepts_at_1_mib_is_accepted_by_the_broker(
    engine: sa.Engine, new_topic: Callable[..., str],
    publisher: Callable[[], KafkaPublisher],
) -> None:
    """Before: publish() counted payload + key + user headers only, and accepted events
    up to ~231 bytes that the broker then refused."""
    topic = new_topic(partitions=1)
    box = Outbox()
    assert box.max_event_bytes == 1024 * 1024
    fields: dict[str, Any] = {"topic": topic, "key": "customer-42", "type": "OrderPlaced",
                              "headers": {"tenant": "eu", "trace": b"\x01" * 40}}
    n = largest_accepted(box, **fields)
    with Session() as s, pytest.raises(PayloadTooLarge, match="over the limit of 1048576"):
        box.publish(s, payload="x" * (n + 1), **fields)
    with Session(engine) as s, s.begin():
        event = box.publish(s, payload="x" * n, **fields)
    t = tables.events
    with engine.connect() as c:
        row = c.execute(sa.select(t).where(t.c.event_id == event.id)).one()
    # The record exactly as the relay builds it from the row.
    record = (row.key.encode(), bytes(row.payload), kafka_headers(
        event_id=row.event_id, type=row.type, source=row.source, occurred_at=row.occurred_at,
        content_type=row.content_type, headers=decode_headers(row.headers)))
    assert 1024 * 1024 - 8 <= record_size(*record) <= 1024 * 1024
    assert send_alone(publisher(), topic, record) is None
