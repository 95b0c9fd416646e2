"""A record too large for its dead-letter topic must not wedge its partition.

The dead-letter copy is the record plus the outbox_* headers, so a record near the
limit does not fit where the original did. The runner sends it with a producer whose
request limit is far above the broker's; if the broker refuses the copy, a truncated
copy (no value, the original's coordinates and size in headers) goes instead, and the
partition moves on. If even that is refused, the runner says so at ERROR, its health
check is red, and the partition waits until the topic accepts it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from kafka import KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from sqlalchemy.orm import Session

from outbox import Event, IdempotentConsumer
from outbox.consumer import ConsumerRunner
from outbox.serde import JsonSerializer
from tests.integration.consumer_app import bump
from tests.integration.test_consumer import (
    client,  # noqa: F401  (fixture)
    counter_table,  # noqa: F401  (fixture)
    counters,
    make_runner,
    read_topic,
    run_until,
    runners,  # noqa: F401  (fixture)
)

MiB = 1024 * 1024
BROKER_DEFAULT = 1048588  # Kafka's default max.message.bytes


@pytest.fixture
def admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    admin_client = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="outbox-tests")
    made: list[str] = []
    admin_client.made = made
    yield admin_client
    if made:
        try:
            admin_client.delete_topics(made)
        except Exception as exc:  # leftovers are unique names; say so, do not fail
            logging.getLogger(__name__).warning("topics not deleted: %s", exc)
    admin_client.close()


def make_topic(admin: KafkaAdminClient, name: str, max_message_bytes: int) -> str:
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1,
                                  topic_configs={"max.message.bytes": str(max_message_bytes)})])
    admin.made.append(name)
    return name


def events_around_a_big_one(topic: str, big_bytes: int) -> list[Event]:
    """A small event, one whose payload is `big_bytes` long, and two small ones."""
    json_ = JsonSerializer()
    payloads: list[dict[str, object]] = [{"i": 0}, {"i": 1, "blob": "x" * big_bytes},
                                         {"i": 2}, {"i": 3}]
    return [Event(topic=topic, key="k", type="Sized", payload=p, data=json_.dumps(p))
            for p in payloads]


def produce_large(bootstrap: str, topic: str, events: list[Event]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8 * MiB)
    try:
        for e in events:
            key, value, headers = e.to_record()
            producer.send(topic, key=key, value=value, headers=headers).get(timeout=30)
    finally:
        producer.close(timeout=10)


class RefusesBig(IdempotentConsumer):
    """Applies every event but the big one, which fails and is dead-lettered at once."""

    max_attempts = 1

    def __init__(self, topic: str, group: str) -> None:
        self.topics = [topic]
        self.group_id = group

    def handle(self, event: Event, session: Session) -> None:
        if "blob" in event.payload:  # a long error: the copy grows by 3 KB more
            raise ValueError("too big to handle" + "!" * 3000)
        bump(session, event)


@pytest.mark.parametrize(("topic_limit", "big", "dlq_limit", "truncated"), [
    # near the broker's default limit: the original fits its topic (of default limit),
    # its copy with the outbox_* headers (3 KB of error) exceeded the dead-letter
    # producer's old 1 MiB request limit; the dead-letter topic accepts more, so the copy
    # goes whole
    (BROKER_DEFAULT, BROKER_DEFAULT - 2000, 2 * MiB, False),
    # a topic that accepts 3 MiB, a dead-letter topic of the default limit: the broker
    # refuses the copy, a truncated copy goes instead
    (3 * MiB, int(1.5 * MiB), BROKER_DEFAULT, True),
], ids=["copy-fits-the-dlq-topic", "copy-truncated"])
def test_a_record_too_large_to_dead_letter_whole_does_not_wedge_its_partition(
    topic_limit: int, big: int, dlq_limit: int, truncated: bool,
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,  # noqa: F811
    admin: KafkaAdminClient, runners: list[ConsumerRunner], client: str,  # noqa: F811
) -> None:
    topic = make_topic(admin, f"big-{uuid.uuid4().hex[:10]}", topic_limit)
    make_topic(admin, topic + ".dlq", dlq_limit)
    events = events_around_a_big_one(topic, big)
    produce_large(kafka_bootstrap, topic, events)

    runner = make_runner(runners, RefusesBig(topic, "big"), db_url, kafka_bootstrap,
                         client=client)
    run_until(runner, lambda: runner.stats.processed == 3 and runner.stats.dead_lettered == 1,
              "the partition to move past the big event", timeout=60)
    assert set(counters(counter_table)) == {events[i].id for i in (0, 2, 3)}
    assert runner.healthy()

    dead = read_topic(kafka_bootstrap, topic + ".dlq", expect=1)
    assert len(dead) == 1
    key, headers, value = dead[0]
    assert key == b"k" and headers["ce_id"] == str(events[1].id).encode()
    assert headers["outbox_original_topic"] == topic.encode()
    assert headers["outbox_original_partition"] == b"0"
    assert headers["outbox_original_offset"] == b"1"
    assert headers["outbox_reason"] == b"handler-failed"
    assert headers["outbox_error"] == b"ValueError: too big to handle" + b"!" * 3000
    if truncated:
        assert value == b""
        assert headers["outbox_truncated"] == b"value"
        assert int(headers["outbox_original_size"]) > big
    else:
        assert value == events[1].data
        assert "outbox_truncated" not in headers


def test_a_copy_that_cannot_be_sent_even_truncated_fails_loudly_and_the_health_is_red(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,  # noqa: F811
    admin: KafkaAdminClient, runners: list[ConsumerRunner], client: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = make_topic(admin, f"big-{uuid.uuid4().hex[:10]}", 3 * MiB)
    dlq = make_topic(admin, topic + ".dlq", 200)  # not even the headers fit
    events = events_around_a_big_one(topic, int(1.5 * MiB))
    produce_large(kafka_bootstrap, topic, events)

    runner = make_runner(runners, RefusesBig(topic, "stuck"), db_url, kafka_bootstrap,
                         client=client)
    run_until(runner, lambda: not runner.healthy() and runner.stats.processed == 1,
              "the runner to report the stuck partition", timeout=60)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("cannot dead-letter" in m and f"{topic}[0] offset 1" in m
               and "even truncated" in m for m in errors), errors
    # it stays stuck and red: the events after the big one wait
    for _ in range(10):
        runner.run_once(0.2)
    assert not runner.healthy() and runner.stats.processed == 1
    assert set(counters(counter_table)) == {events[0].id}

    # once the dead-letter topic accepts it, the partition moves on and the health is green
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, dlq,
                                        configs={"max.message.bytes": str(4 * MiB)})])
    run_until(runner, lambda: runner.stats.processed == 3, "the partition to move on",
              timeout=60)
    assert runner.healthy() and runner.stats.dead_lettered == 1
    assert set(counters(counter_table)) == {events[i].id for i in (0, 2, 3)}
    dead = read_topic(kafka_bootstrap, dlq, expect=1)
    assert len(dead) == 1 and dead[0][2] == events[1].data
