"""`outbox status` on the real PostgreSQL and Kafka: the kafka-python GroupOffsets, the
store's status statements, and `--json` with a consumer group end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
import sqlalchemy as sa
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTP
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.consumer.source import TopicPartition
from outbox.dburl import libpq_url
from outbox.kafka_lag import KafkaGroupOffsets
from outbox.schema import make_tables
from outbox.status import PostgresOutbox, gather
from outbox.store import Store
from tests.unit.test_status import HELD, SCHEMA, conforms


def produce(bootstrap: str, topic: str, partition: int, ids: list[str]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i in ids:
        producer.send(topic, key=b"k", value=b"{}", partition=partition,
                      headers=[("ce_id", i.encode())])
    producer.flush(10)
    producer.close()


def commit(bootstrap: str, group: str, offsets: dict[tuple[str, int], int]) -> None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                             enable_auto_commit=False)
    consumer.commit({KafkaTP(t, p): OffsetAndMetadata(o, "", -1)
                     for (t, p), o in offsets.items()})
    consumer.close(autocommit=False)


@pytest.fixture
def lag(kafka_bootstrap: str) -> Iterator[KafkaGroupOffsets]:
    reader = KafkaGroupOffsets(kafka_bootstrap)
    yield reader
    reader.close()


def test_kafka_group_offsets_reads_commits_ends_sizes_and_ids(
        kafka_bootstrap: str, new_topic: Callable[..., str], lag: KafkaGroupOffsets) -> None:
    topic = new_topic(2)
    dlq = new_topic(1)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    produce(kafka_bootstrap, topic, 0, ids)
    produce(kafka_bootstrap, topic, 1, ids[:2])
    produce(kafka_bootstrap, dlq, 0, ids[:3])
    group = f"status-{uuid.uuid4().hex[:8]}"
    commit(kafka_bootstrap, group, {(topic, 0): 2, (topic, 1): 2})
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)

    assert lag.committed(group) == {p0: 2, p1: 2}
    assert lag.committed(f"never-{group}") == {}
    assert lag.end_offsets([p0, p1]) == {p0: 5, p1: 2}
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    assert lag.record_counts([dlq, missing]) == {dlq: 3}
    assert lag.event_ids_at({p0: 2, p1: 1}) == {p0: ids[2], p1: ids[1]}
    assert lag.event_ids_at({p0: 4}) == {p0: ids[4]}
    looker = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        assert missing not in looker.topics(), "reading a missing topic's size created it"
    finally:
        looker.close()


def publish(engine: sa.Engine, n: int, topic: str = "t") -> list[str]:
    box = Outbox()
    with Session(engine) as s, s.begin():
        return [str(box.publish(s, topic=topic, key=f"k{i}", type="T", payload={}).id)
                for i in range(n)]


def test_store_status_statements(engine: sa.Engine, db_url: str) -> None:
    publish(engine, 5)
    reader = PostgresOutbox(lambda: psycopg.connect(libpq_url(db_url), autocommit=True),
                            Store(make_tables("outbox")))
    try:
        status = gather(reader)
        assert status.pending == 5 and status.positions_drawn == 5
        oldest = status.oldest_pending_seconds
        assert oldest is not None and 0 <= oldest < 60
        publish(engine, 2)
        assert gather(reader).positions_drawn == 7
    finally:
        reader.close()


def test_status_json_reports_a_held_partition_end_to_end(
        engine: sa.Engine, db_url: str, kafka_bootstrap: str,
        new_topic: Callable[..., str]) -> None:
    publish(engine, 3)
    topic = new_topic(1)
    dlq = topic + ".dlq"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(dlq, num_partitions=1, replication_factor=1)])
    try:
        held_in_kafka(engine, db_url, kafka_bootstrap, topic, dlq)
    finally:
        admin.delete_topics([dlq])
        admin.close()


def held_in_kafka(engine: sa.Engine, db_url: str, kafka_bootstrap: str, topic: str,
                  dlq: str) -> None:
    ids = [str(uuid.uuid4()) for _ in range(4)]
    produce(kafka_bootstrap, topic, 0, ids)
    produce(kafka_bootstrap, dlq, 0, ids[:1])
    group = f"status-{uuid.uuid4().hex[:8]}"
    commit(kafka_bootstrap, group, {(topic, 0): 1})
    with engine.begin() as c:  # as the consumer leaves an event it is retrying
        c.execute(sa.text(
            "INSERT INTO outbox_attempts (consumer_group, event_id, attempts, last_error, "
            "updated_at) VALUES (:g, :e, 2, 'ValueError: boom', now())"),
            {"g": group, "e": ids[1]})
    out = subprocess.run(
        [sys.executable, "-m", "outbox.cli", "status", "--json", "--db", db_url,
         "--kafka", kafka_bootstrap, "--group", group], capture_output=True, text=True,
        timeout=60, env=os.environ)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert conforms(doc, SCHEMA) == []
    assert doc["pending"] == 3
    [g] = doc["consumer_groups"]
    assert g["group"] == group and g["lag"] == 3 and g["retrying_events"] == 1
    [p] = g["partitions"]
    assert (p["committed"], p["end"], p["lag"]) == (1, 4, 3)
    assert conforms(p["held"], HELD) == []
    assert p["held"] == {"event_id": ids[1], "attempts": 2, "last_error": "ValueError: boom"}
    assert g["dead_letter_topics"] == {dlq: 1}


def test_status_with_kafka_down_prints_the_report_then_fails(engine: sa.Engine,
                                                           db_url: str) -> None:
    with engine.begin() as c:
        c.execute(sa.text(
            "INSERT INTO outbox_attempts (consumer_group, event_id, attempts, last_error, "
            "updated_at) VALUES ('g1', :e, 1, 'x', now())"), {"e": str(uuid.uuid4())})
    out = subprocess.run(
        [sys.executable, "-m", "outbox.cli", "status", "--db", db_url, "--kafka",
         "127.0.0.1:1"], capture_output=True, text=True, timeout=90, env=os.environ)
    assert out.returncode == 1
    assert "pending events: 0" in out.stdout and "g1: Kafka:" in out.stdout
    assert "consumer group g1: Kafka:" in out.stderr and "Traceback" not in out.stderr
