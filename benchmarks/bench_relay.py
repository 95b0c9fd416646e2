"""Relay throughput: one relay draining a 100,000-event backlog, beside the raw kafka-python
producer sending the same records (same keys, values, headers, settings) in the same run."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from benchmarks.common import Result, drop_database, fresh_database
from outbox.dburl import libpq_url
from outbox.event import kafka_headers
from outbox.publisher import KafkaPublisher, KafkaSettings
from outbox.relay import Relay, RelayConfig
from outbox.writer import shard_of

EVENTS = 100_000
KEYS = 1_000


def _topic(kafka: str) -> str:
    name = f"bench-relay-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    admin.create_topics([NewTopic(name, num_partitions=6, replication_factor=1)])
    admin.close()
    return name


def _backlog(url: str, topic: str) -> None:
    """Fill the outbox fast, with COPY (the write path is measured elsewhere)."""
    from datetime import UTC, datetime

    from outbox.event import uuid7

    now = datetime.now(UTC)
    with psycopg.connect(libpq_url(url)) as conn, conn.cursor() as cur, cur.copy(
        "COPY outbox_events (event_id, topic, key, type, payload, content_type, source, "
        "occurred_at, shard) FROM STDIN"
    ) as copy:
        for i in range(EVENTS):
            key = f"customer-{i % KEYS}"
            copy.write_row((uuid7(), topic, key, "OrderPlaced",
                            b'{"id":%d,"amount":42,"currency":"EUR"}' % i, "application/json",
                            "bench", now, shard_of(key, 16)))


def _raw(kafka: str, topic: str, settings: KafkaSettings) -> float:
    """The ceiling: the raw producer, same records and settings, no database."""
    from datetime import UTC, datetime

    from outbox.event import uuid7

    now = datetime.now(UTC)
    records: list[tuple[bytes, bytes, Any]] = []
    for i in range(EVENTS):
        key = f"customer-{i % KEYS}"
        records.append((key.encode(), b'{"id":%d,"amount":42,"currency":"EUR"}' % i,
                        kafka_headers(event_id=uuid7(), type="OrderPlaced", source="bench",
                                      occurred_at=now, content_type="application/json",
                                      headers={})))
    producer = KafkaProducer(bootstrap_servers=kafka, enable_idempotence=True, acks="all",
                             linger_ms=settings.linger_ms, batch_size=settings.batch_size,
                             max_request_size=settings.max_request_size)
    started = time.monotonic()
    futures = [producer.send(topic, key=k, value=v, headers=h) for k, v, h in records]
    producer.flush()
    elapsed = time.monotonic() - started
    assert all(f.succeeded() for f in futures)
    producer.close()
    return EVENTS / elapsed


def run(db_url: str, kafka: str) -> list[Result]:
    settings = KafkaSettings(kafka)
    url = fresh_database(db_url)
    try:
        topic = _topic(kafka)
        _backlog(url, topic)
        relay = Relay(RelayConfig(db_url=url), lambda: KafkaPublisher(settings))
        started = time.monotonic()
        while relay.step(wait=False) or relay.published < EVENTS:
            if time.monotonic() - started > 600:
                raise RuntimeError("relay did not drain the backlog in 10 minutes")
        elapsed = time.monotonic() - started
        relay._close()
        rate = relay.published / elapsed
        ceiling = _raw(kafka, _topic(kafka), settings)
    finally:
        drop_database(db_url, url)
    return [Result(f"relay: drain {EVENTS:,}-event backlog, 1 relay", rate, "events/s",
                   "raw kafka-python producer", ceiling)]
