"""Proof that both servers are real: Kafka keeps keys, headers and order; PostgreSQL commits."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable

import psycopg
from kafka import KafkaConsumer, KafkaProducer

from outbox.dburl import libpq_url


def test_kafka_keeps_keys_headers_and_per_partition_order(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True,
                             acks="all")
    sent = []
    for i in range(300):
        key = f"k{i % 7}".encode()
        headers = [("ce_id", str(uuid.uuid4()).encode()), ("n", str(i).encode())]
        meta = producer.send(topic, key=key, value=f"v{i}".encode(), headers=headers).get(30)
        sent.append((meta.partition, meta.offset, key, f"v{i}".encode(), headers))
    producer.close()
    assert {p for p, *_ in sent} == {0, 1, 2}, "keys should spread over all 3 partitions"

    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap,
                             group_id=f"smoke-{uuid.uuid4().hex[:6]}",
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=15000)
    got = []
    for rec in consumer:
        got.append((rec.partition, rec.offset, rec.key, rec.value, list(rec.headers)))
        if len(got) == len(sent):
            break
    consumer.commit()
    consumer.close()
    assert sorted(got) == sorted(sent)
    by_partition: dict[int, list[int]] = defaultdict(list)
    for p, _offset, _k, value, _h in got:
        by_partition[p].append(int(value[1:]))
    for values in by_partition.values():
        assert values == sorted(values), "per-partition order must be the send order"


def test_postgres_commit_keeps_rows_and_rollback_leaves_none(db_url: str) -> None:
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute("CREATE TABLE smoke (id int primary key)")
        conn.commit()
        conn.execute("INSERT INTO smoke VALUES (1)")
        conn.commit()
        conn.execute("INSERT INTO smoke VALUES (2)")
        conn.rollback()
        rows = conn.execute("SELECT id FROM smoke ORDER BY id").fetchall()
    assert rows == [(1,)]
