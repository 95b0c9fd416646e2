"""publish() counts an event's size as Kafka counts it: the whole record batch.

`record_size` is checked byte for byte against kafka-python's own batch builder;
publish()'s count against `record_size` of the record the relay sends; and publish()'s
limit at the edges. tests/integration/test_publish_size.py checks the broker agrees.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.util import size_of_varint
from sqlalchemy.orm import Session

from outbox import BytesSerializer, Event, JsonSerializer, Outbox, PayloadTooLarge
from outbox.event import KafkaHeaders, RecordSizer, check_headers, record_size, varint_size

LONGEST_TIME = "2026-01-02T03:04:05.678901Z"  # ce_time at its longest: 27 bytes


def kafka_python_size(key: bytes | None, value: bytes | None, headers: KafkaHeaders) -> int:
    """The bytes kafka-python puts on the wire for a batch holding this record alone."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0,
                                        producer_id=7, producer_epoch=0, base_sequence=0,
                                        batch_size=16 * 1024 * 1024)
    assert builder.append(0, timestamp=1_767_000_000_000, key=key, value=value,
                          headers=headers) is not None
    return len(builder.build())


def worst_case(record: tuple[bytes, bytes, KafkaHeaders]) -> int:
    """record_size with ce_time at its longest, as publish() counts it."""
    key, value, headers = record
    return record_size(key, value, [(n, LONGEST_TIME.encode() if n == "ce_time" else v)
                                    for n, v in headers])


@pytest.fixture
def session() -> Iterator[Session]:
    """A session with no database: publish() never touches one."""
    with Session() as s:
        yield s


def test_varint_size_matches_kafka_python() -> None:
    values = [-1, 0, 1, 63, 64, 65, 8191, 8192, 1048575, 1048576, 2**27, 2**31 - 1]
    values += list(range(0, 20000, 7))
    for n in values:
        assert varint_size(n) == size_of_varint(n), n


@pytest.mark.parametrize("key_len", [0, 1, 63, 64, 8191, 8192])
@pytest.mark.parametrize("value_len", [0, 63, 64, 8191, 8192, 1048575, 1048576, 1048600])
def test_record_size_is_what_kafka_python_builds(key_len: int, value_len: int) -> None:
    event = Event(topic="t", key="k" * key_len, type="OrderPlaced", payload=None,
                  data=b"v" * value_len, source="shop",
                  headers={"tenant": "eu", "raw": b"\x00" * 70, "é" * 40: "ü" * 5000})
    key, value, headers = event.to_record()
    assert record_size(key, value, headers) == kafka_python_size(key, value, headers)


@pytest.mark.parametrize("headers", [
    [], [("a", b"")], [("h" * 64, b"x" * 8192)], [(f"h{i}", b"v") for i in range(70)],
    [("ümlaut", "ß".encode() * 100)],
])
def test_record_size_with_any_headers_and_null_key_or_value(headers: KafkaHeaders) -> None:
    for key, value in [(None, None), (b"", b""), (b"k", None), (None, b"v" * 300)]:
        assert record_size(key, value, headers) == kafka_python_size(key, value, headers)


@pytest.mark.parametrize("headers", [
    {}, {"tenant": "eu"}, {"raw": b"\x01" * 200}, {"ñame": "välue" * 3000},
    {f"h{i}": str(i) for i in range(80)},
])
@pytest.mark.parametrize("key", ["", "customer-42", "ключ" * 40])
def test_publish_counts_the_record_the_relay_sends(
    session: Session, headers: dict[str, Any], key: str
) -> None:
    """RecordSizer equals record_size of Event.to_record() with ce_time at its longest,
    and is never under the real size, whatever the time's fraction of a second."""
    for source in ("transactional-outbox", "s" * 200):
        box = Outbox(source=source)
        sizer = RecordSizer(source=source, content_type=box.serializer.content_type)
        payloads: list[object] = [{}, "x" * 60, "y" * 9000]
        for payload in payloads:
            event = box.publish(session, topic="t", key=key, type="Type" * 20,
                                payload=payload, headers=headers)
            user, user_len = check_headers(headers)
            counted = sizer.size(key=len(key.encode()), value=len(event.data),
                                 type=len(event.type.encode()), headers=user_len,
                                 header_count=len(user))
            assert counted == worst_case(event.to_record())
            for when in (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
                         datetime(2026, 1, 2, 3, 4, 5, 1, tzinfo=UTC)):
                exact = Event(topic="t", key=key, type=event.type, payload=None,
                              data=event.data, source=source, headers=event.headers,
                              id=uuid.uuid4(), occurred_at=when).to_record()
                assert 0 <= counted - record_size(*exact) <= 7


def largest_accepted(session: Session, box: Outbox, **fields: Any) -> int:
    """The longest bytes payload publish() accepts with these fields (binary search)."""
    lo, hi = 0, box.max_event_bytes
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            box.publish(session, payload=b"x" * mid, **fields)
        except PayloadTooLarge:
            hi = mid - 1
        else:
            lo = mid
    return lo


@pytest.mark.parametrize("limit", [1000, 8192 + 61, 65536, 1024 * 1024, 1048588])
@pytest.mark.parametrize("fields", [
    {"key": "k", "type": "T", "headers": None},
    {"key": "customer-" + "9" * 100, "type": "OrderPlaced", "headers": {"tenant": "eu"}},
    {"key": "ü" * 50, "type": "T" * 70, "headers": {f"h{i}": b"v" * i for i in range(20)}},
])
def test_publish_accepts_up_to_the_limit_as_kafka_counts_and_not_a_byte_more(
    session: Session, limit: int, fields: dict[str, Any]
) -> None:
    """The old count (payload + key + headers) let through events up to ~231 bytes
    over the limit as the broker counts them."""
    box = Outbox(max_event_bytes=limit, serializer=BytesSerializer())
    n = largest_accepted(session, box, topic="orders", **fields)
    accepted = box.publish(session, topic="orders", payload=b"x" * n, **fields)
    assert limit - 2 <= worst_case(accepted.to_record()) <= limit  # a varint may grow by 1
    with pytest.raises(PayloadTooLarge, match=f"over the limit of {limit} bytes"):
        box.publish(session, topic="orders", payload=b"x" * (n + 1), **fields)
    bigger = dataclasses.replace(accepted, data=b"x" * (n + 1))
    assert worst_case(bigger.to_record()) > limit


def test_the_error_names_the_size_kafka_counts(session: Session) -> None:
    box = Outbox(max_event_bytes=200, serializer=JsonSerializer())
    with pytest.raises(PayloadTooLarge, match=r"is \d+ bytes as Kafka counts it"):
        box.publish(session, topic="t", key="k", type="T", payload="x" * 100)
