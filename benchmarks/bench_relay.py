"""Relay throughput against its ceilings, all measured in this run on the same records
(common.record: 1,000 keys, a ~40-byte JSON value, the six CloudEvents headers, a
6-partition topic, acks=all, idempotence on):

- the raw kafka-python and raw confluent-kafka producers, no database: the ceilings;
- one relay draining a 100,000-event backlog with each client, as a ratio to its own
  client's ceiling, and the confluent relay as a ratio to the kafka-python relay;
- the raw consumers of both clients reading the same records: ceilings only, for the
  consumer benchmarks to compare to.

Every producer, raw or the relay's, has sent one record to its topic before the clock
starts, so the connection, the producer id and the topic's metadata are not timed.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from benchmarks.common import (
    Result,
    close,
    database,
    drain,
    fill,
    record,
    relay_for,
    sized,
    topics,
)
from outbox.confluent import producer_config
from outbox.publisher import KafkaSettings

EVENTS = sized(100_000)
POLL_BATCH = 1_000  # records per consumer poll, for both clients
TIMEOUT = 300.0


def _records(n: int) -> list[tuple[bytes, bytes, Any]]:
    now = datetime.now(UTC)
    return [record(i, now) for i in range(n)]


def raw_kafka_python(kafka: str, topic: str, n: int = EVENTS) -> float:
    """kafka-python's producer with the relay's settings (KafkaPublisher's)."""
    from kafka import KafkaProducer

    settings = KafkaSettings(kafka)
    records = _records(n)
    producer = KafkaProducer(bootstrap_servers=kafka, enable_idempotence=True, acks="all",
                             linger_ms=settings.linger_ms, batch_size=settings.batch_size,
                             max_request_size=settings.max_request_size,
                             max_in_flight_requests_per_connection=5)
    try:
        producer.send(topic, key=records[0][0], value=records[0][1],
                      headers=records[0][2]).get(timeout=TIMEOUT)  # warm up
        started = time.monotonic()
        futures = [producer.send(topic, key=k, value=v, headers=h) for k, v, h in records]
        producer.flush()
        elapsed = time.monotonic() - started
        failed = sum(1 for f in futures if not f.succeeded())
    finally:
        producer.close()
    if failed:
        raise RuntimeError(f"raw kafka-python producer: {failed} records failed")
    return n / elapsed


def raw_confluent(kafka: str, topic: str, n: int = EVENTS) -> float:
    """confluent-kafka's producer with the relay's librdkafka settings
    (outbox.confluent.producer_config): produce all with a delivery callback, serve
    reports every 1,000 records, flush."""
    from confluent_kafka import Producer

    config = {**producer_config(KafkaSettings(kafka)), "client.id": "outbox-bench-raw"}
    records = _records(n)
    errors: list[Any] = []
    acked = 0

    def on_delivery(error: Any, message: Any) -> None:
        nonlocal acked
        if error is not None:
            errors.append(error)
        else:
            acked += 1

    producer = Producer(config)
    producer.produce(topic, records[0][1], records[0][0], on_delivery=on_delivery,
                     headers=records[0][2])  # warm up
    if producer.flush(TIMEOUT) or errors:
        raise RuntimeError(f"raw confluent producer: warm-up failed {errors[:1]}")
    acked = 0
    started = time.monotonic()
    for i, (k, v, h) in enumerate(records):
        while True:
            try:
                producer.produce(topic, v, k, on_delivery=on_delivery, headers=h)
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                producer.poll(0.05)
        if i % 1000 == 999:
            producer.poll(0)
    left = producer.flush(TIMEOUT)
    elapsed = time.monotonic() - started
    if left or errors or acked != n:
        raise RuntimeError(f"raw confluent producer: {acked} acked, {left} unflushed, "
                           f"errors {errors[:3]}")
    return n / elapsed


def consumer_kafka_python(kafka: str, topic: str, n: int = EVENTS) -> float:
    """A new group reads the topic from the beginning; read only (no commits, no
    handler). Timed from the first record, so the group join is not counted."""
    from kafka import KafkaConsumer

    reader = KafkaConsumer(topic, bootstrap_servers=kafka, group_id=f"raw-{topic}",
                           enable_auto_commit=False, auto_offset_reset="earliest",
                           max_poll_records=POLL_BATCH)
    seen, started = 0, 0.0
    deadline = time.monotonic() + TIMEOUT
    try:
        while seen < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw kafka-python consumer read {seen} of {n}")
            batch = reader.poll(timeout_ms=500)
            if batch and not started:
                started = time.monotonic()
            for records in batch.values():
                seen += len(records)
        return seen / (time.monotonic() - started)
    finally:
        reader.close()


def consumer_confluent(kafka: str, topic: str, n: int = EVENTS) -> float:
    """The same with confluent-kafka's Consumer, `consume` 1,000 at a time."""
    from confluent_kafka import Consumer

    reader = Consumer({"bootstrap.servers": kafka, "group.id": f"raw-c-{topic}",
                       "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    reader.subscribe([topic])
    seen, started = 0, 0.0
    deadline = time.monotonic() + TIMEOUT
    try:
        while seen < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw confluent consumer read {seen} of {n}")
            batch = reader.consume(POLL_BATCH, 0.5)
            if batch and not started:
                started = time.monotonic()
            for message in batch:
                if message.error() is None:
                    seen += 1
        return seen / (time.monotonic() - started)
    finally:
        reader.close()


def relay_rate(db_url: str, kafka: str, topic: str, client: str) -> tuple[float, float]:
    """One relay draining an EVENTS backlog (filled by COPY); (events/s, fill seconds)."""
    with database(db_url) as url:
        relay = relay_for(url, kafka, client, topic)
        try:
            filled = fill(url, topic, EVENTS)
            return drain(relay, EVENTS), filled
        finally:
            close(relay)


def run(db_url: str, kafka: str) -> list[Result]:
    with topics(kafka) as new:
        raw_topic = new("raw-kp")
        raw_kp = raw_kafka_python(kafka, raw_topic)
        raw_cf = raw_confluent(kafka, new("raw-cf"))
        relay_kp, _ = relay_rate(db_url, kafka, new("relay-kp"), "kafka-python")
        relay_cf, _ = relay_rate(db_url, kafka, new("relay-cf"), "confluent")
        read_kp = consumer_kafka_python(kafka, raw_topic)
        read_cf = consumer_confluent(kafka, raw_topic)
    backlog = f"{EVENTS:,}-event backlog"
    return [
        Result("raw producer, kafka-python", raw_kp, "records/s",
               note=f"{EVENTS:,} records, the ceiling of the kafka-python relay"),
        Result("raw producer, confluent-kafka", raw_cf, "records/s",
               note=f"{EVENTS:,} records, the ceiling of the confluent relay"),
        Result("relay, kafka-python", relay_kp, "events/s", "raw kafka-python producer",
               raw_kp, note=f"1 relay draining a {backlog}", target=(">=", 0.9)),
        Result("relay, confluent-kafka", relay_cf, "events/s", "raw confluent producer",
               raw_cf, note=f"1 relay draining a {backlog}", target=(">=", 0.4)),
        Result("relay, confluent vs kafka-python", relay_cf, "events/s",
               "relay, kafka-python", relay_kp, note="the fast lane's gain",
               target=(">=", 5.0)),
        Result("raw consumer, kafka-python", read_kp, "records/s",
               note=f"read only, {POLL_BATCH:,} per poll: ceiling for the consumer",
               panel="raw consumers"),
        Result("raw consumer, confluent-kafka", read_cf, "records/s",
               note=f"read only, {POLL_BATCH:,} per consume: ceiling for the consumer",
               panel="raw consumers"),
    ]
