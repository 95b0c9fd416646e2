"""Consumer throughput: events/s through the ConsumerRunner with deduplication, beside a
raw kafka-python consumer reading the same topic in the same run (the ceiling).

The handler inserts one row per event. A third run with the dedupe record switched off
(fault-injection switch, never for production) shows what deduplication itself costs.
Each rate is measured from the first record received to the last one committed, so the
group join is not counted.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import sqlalchemy as sa
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from sqlalchemy.orm import Session

from benchmarks.common import Result, drop_database, fresh_database
from outbox import Event, IdempotentConsumer, _unsafe
from outbox.consumer import ConsumerRunner
from outbox.serde import JsonSerializer

EVENTS = 20_000
PARTITIONS = 3
MAX_POLL_RECORDS = 500
TIMEOUT = 300.0
_SINK = sa.text("INSERT INTO bench_sink (event_id, i) VALUES (:id, :i)")


class Sink(IdempotentConsumer):
    def __init__(self, topic: str, group: str) -> None:
        self.topics = [topic]
        self.group_id = group

    def handle(self, event: Event, session: Session) -> None:
        session.execute(_SINK, {"id": event.id, "i": event.payload["i"]})


def _produce(kafka: str, topic: str) -> None:
    json_ = JsonSerializer()
    producer = KafkaProducer(bootstrap_servers=kafka, enable_idempotence=True, acks="all",
                             linger_ms=20, batch_size=256 * 1024)
    try:
        for i in range(EVENTS):
            payload = {"i": i, "order": f"o-{i}", "amount": i % 997}
            e = Event(topic=topic, key=f"k{i % 1000}", type="OrderPlaced", payload=payload,
                      data=json_.dumps(payload))
            key, value, headers = e.to_record()
            producer.send(topic, key=key, value=value, headers=headers)
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=10)


def _raw_rate(kafka: str, topic: str) -> float:
    reader = KafkaConsumer(topic, bootstrap_servers=kafka, group_id=f"bench-raw-{topic}",
                           enable_auto_commit=False, auto_offset_reset="earliest",
                           max_poll_records=MAX_POLL_RECORDS)
    seen = 0
    started: float | None = None
    deadline = time.monotonic() + TIMEOUT
    try:
        while seen < EVENTS:
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw consumer read {seen} of {EVENTS}")
            batch = reader.poll(timeout_ms=500)
            if batch and started is None:
                started = time.monotonic()
            for records in batch.values():
                seen += sum(1 for r in records if r.value is not None)
            if batch:
                reader.commit()  # what any at-least-once consumer does per batch
        assert started is not None
        return EVENTS / (time.monotonic() - started)
    finally:
        reader.close()


def _runner_rate(db_url: str, kafka: str, topic: str, group: str) -> float:
    runner = ConsumerRunner(Sink(topic, group), db_url=db_url, kafka=kafka,
                            max_poll_records=MAX_POLL_RECORDS)
    started: float | None = None
    done = 0
    deadline = time.monotonic() + TIMEOUT
    try:
        while done < EVENTS:
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumer finished {done} of {EVENTS}")
            batch = runner.poll(0.5)
            if batch and started is None:
                started = time.monotonic()
            if batch:
                done += runner.process(batch)
        assert started is not None
        elapsed = time.monotonic() - started
    finally:
        runner.close()
    if runner.stats.processed != EVENTS:
        raise AssertionError(f"expected {EVENTS} processed, got {runner.stats}")
    return EVENTS / elapsed


def run(db_url: str, kafka: str) -> list[Result]:
    url = fresh_database(db_url)
    topic = f"bench-consumer-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka, client_id="outbox-bench")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as c:
            c.execute(sa.text("CREATE TABLE bench_sink (event_id uuid PRIMARY KEY, i int)"))
        admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
        _produce(kafka, topic)
        raw = _raw_rate(kafka, topic)
        deduped = _runner_rate(url, kafka, topic, "bench-dedupe")
        with engine.begin() as c:
            c.execute(sa.text("TRUNCATE bench_sink"))
        with _unsafe.disable("dedupe"):
            bare = _runner_rate(url, kafka, topic, "bench-bare")
    finally:
        engine.dispose()
        with contextlib.suppress(Exception):
            admin.delete_topics([topic])
        admin.close()
        drop_database(db_url, url)
    note = f"{EVENTS:,} events, {PARTITIONS} partitions, {MAX_POLL_RECORDS} per poll"
    return [
        Result("consumer: dedupe + 1-row handler", deduped, "events/s",
               "raw kafka-python consumer", raw, note),
        Result("consumer: dedupe cost (with / without)", deduped, "events/s",
               "same consumer, dedupe off (unsafe)", bare, note),
    ]
