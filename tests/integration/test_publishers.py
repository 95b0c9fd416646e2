"""One Publisher contract, both Kafka clients, against the real broker."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer

from outbox.publisher import CLIENTS, KafkaSettings, make_publisher


def _read(bootstrap: str, topic: str, expect: int) -> list[tuple[int, bytes, bytes]]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=f"r-{uuid.uuid4().hex[:6]}")
    out: list[tuple[int, bytes, bytes]] = []
    deadline = time.monotonic() + 60
    while len(out) < expect and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=1000).values():
            out.extend((r.partition, r.key, r.value) for r in records)
    consumer.close()
    return out


@pytest.mark.parametrize("client", CLIENTS)
def test_every_record_is_acknowledged_and_each_key_keeps_its_order(
    kafka_bootstrap: str, new_topic: Callable[..., str], client: str
) -> None:
    topic = new_topic(partitions=6)
    publisher = make_publisher(client, KafkaSettings(kafka_bootstrap))
    sent: dict[bytes, list[bytes]] = defaultdict(list)
    deliveries = []
    for i in range(5000):
        key, value = f"k{i % 100}".encode(), str(i).encode()
        sent[key].append(value)
        deliveries.append(publisher.send(topic, key, value, [("ce_id", value)]))
    deadline = time.monotonic() + 60
    while not all(d.done() for d in deliveries) and time.monotonic() < deadline:
        publisher.flush(1.0)
    publisher.close()
    assert all(d.done() and d.error() is None for d in deliveries)
    got: dict[bytes, list[bytes]] = defaultdict(list)
    for _, key, value in _read(kafka_bootstrap, topic, 5000):
        got[key].append(value)
    assert dict(got) == dict(sent)


def test_both_clients_put_a_key_in_the_same_partition(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    """Switching a relay's client must not move a key to another partition (order)."""
    placed: dict[str, dict[bytes, int]] = {}
    for client in CLIENTS:
        topic = new_topic(partitions=6)
        publisher = make_publisher(client, KafkaSettings(kafka_bootstrap))
        keys = [f"customer-{i}".encode() for i in range(200)]
        deliveries = [publisher.send(topic, k, b"v", []) for k in keys]
        while not all(d.done() for d in deliveries):
            publisher.flush(1.0)
        publisher.close()
        placed[client] = {k: p for p, k, _ in _read(kafka_bootstrap, topic, 200)}
    assert placed["kafka-python"] == placed["confluent"]
