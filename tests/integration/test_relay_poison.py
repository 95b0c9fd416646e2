"""One event Kafka cannot take must cost only that event's shard, and only that event.

Real broker: a topic with no metadata (a name that collides with an existing topic, so the
broker refuses to auto-create it, exactly as a missing topic with auto-create off), and an
oversized record sent beside small records of other shards.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from kafka.admin import KafkaAdminClient, NewTopic
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.keys import shard_of
from outbox.publisher import CLIENTS, KafkaSettings, make_publisher
from outbox.relay import Relay, RelayConfig
from outbox.schema import tables
from tests.integration.test_relay import read_topic


def _keys_off_shard(avoid: int, n: int, shards: int = 16) -> list[str]:
    keys = (f"k{i}" for i in range(10_000))
    return [k for k in keys if shard_of(k, shards) != avoid][:n]


def _rows(engine: sa.Engine) -> list[sa.Row[tuple[str, str, int]]]:
    with engine.connect() as c:
        return list(c.execute(sa.select(tables.events.c.topic, tables.events.c.key,
                                        tables.events.c.attempts)))


def _dead(engine: sa.Engine) -> list[sa.Row[tuple[uuid.UUID, int, str]]]:
    with engine.connect() as c:
        return list(c.execute(sa.select(tables.dead_letters.c.event_id,
                                        tables.dead_letters.c.attempts,
                                        tables.dead_letters.c.error)))


@pytest.mark.parametrize("client", CLIENTS)
def test_a_topic_kafka_has_no_metadata_for_holds_only_its_own_shard(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str, new_topic: Callable[..., str],
    client: str,
) -> None:
    good = new_topic()
    tag = uuid.uuid4().hex[:8]
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(f"wedge.{tag}", 1, 1)])
    admin.close()
    bad_topic = f"wedge_{tag}"  # collides with wedge.<tag>: the broker will not create it
    box = Outbox()
    bad_key = "poisoned"
    others = _keys_off_shard(shard_of(bad_key, 16), 60)
    with Session(engine) as s, s.begin():
        bad = box.publish(s, topic=bad_topic, key=bad_key, type="Lost", payload={})
        after = [box.publish(s, topic=good, key=bad_key, type="After", payload={"n": n})
                 for n in range(2)]
        for i, key in enumerate(others):
            box.publish(s, topic=good, key=key, type="Other", payload={"i": i})

    config = RelayConfig(db_url=db_url, max_attempts=3, retry_base=0.05, retry_max=0.2)
    publisher = make_publisher(client, KafkaSettings(kafka_bootstrap, max_block_ms=1000))
    relay = Relay(config, lambda: publisher)
    others_done_at = dead_at = None
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and (others_done_at is None or dead_at is None
                                               or _rows(engine)):
            relay.step(wait=False)
            rows = _rows(engine)
            if others_done_at is None and all(key == bad_key for _, key, _ in rows):
                others_done_at = time.monotonic()
                # the other shards did not wait for the poisoned one
                assert [(t, a > 0) for t, k, a in rows if t == bad_topic] in (
                    [(bad_topic, True)], [(bad_topic, False)]), rows
                assert dead_at is None, "other shards waited for the dead letter"
            if dead_at is None and _dead(engine):
                dead_at = time.monotonic()
            time.sleep(0.02)
    finally:
        relay._close()
    assert others_done_at is not None and dead_at is not None, _rows(engine)
    [(dead_id, attempts, error)] = _dead(engine)
    assert dead_id == bad.id and "TopicUnavailable" in error, error
    assert attempts == config.max_attempts - 1  # the failed attempts before the last
    assert _rows(engine) == []  # and its shard moved on
    got = read_topic(kafka_bootstrap, good, 62)
    missing = 62 - len({h["ce_id"] for _, h, _ in got})
    if missing:  # copies (at least once) took the places of records not read yet
        got = read_topic(kafka_bootstrap, good, len(got) + missing)
    firsts = list(dict.fromkeys(h["ce_id"].decode() for k, h, _ in got if k == bad_key))
    assert firsts == [str(e.id) for e in after]  # after the dead letter, in order
    assert len({h["ce_id"] for _, h, _ in got}) == 62


@pytest.mark.parametrize("client", CLIENTS)
def test_an_oversized_event_dead_letters_only_itself_across_shards(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str, new_topic: Callable[..., str],
    client: str,
) -> None:
    topic = new_topic(partitions=6)
    box = Outbox(max_event_bytes=4 * 1024 * 1024)
    keys = [f"key{i}" for i in range(40)]
    expected: dict[str, list[str]] = defaultdict(list)
    with Session(engine) as s, s.begin():
        for round_ in range(3):
            for key in keys:
                e = box.publish(s, topic=topic, key=key, type="Small", payload={"r": round_})
                expected[key].append(str(e.id))
            if round_ == 1:  # in the middle of the batch, beside every other shard's events
                big = box.publish(s, topic=topic, key="huge", type="Huge",
                                  payload="x" * (2 * 1024 * 1024))
    publisher = make_publisher(client, KafkaSettings(kafka_bootstrap))
    relay = Relay(RelayConfig(db_url=db_url), lambda: publisher)
    deadline = time.monotonic() + 60
    try:
        while _rows(engine) and time.monotonic() < deadline:
            relay.step(wait=False)
    finally:
        relay._close()
    dead = _dead(engine)
    assert [d[0] for d in dead] == [big.id], [(d[0], d[2][:80]) for d in dead]
    assert _rows(engine) == []
    got = read_topic(kafka_bootstrap, topic, len(keys) * 3)
    firsts: dict[str, list[str]] = defaultdict(list)
    for key, headers, _ in got:
        event_id = headers["ce_id"].decode()
        if event_id not in firsts[key]:
            firsts[key].append(event_id)
    assert dict(firsts) == dict(expected)  # nothing lost, each key in commit order


def test_several_topics_without_metadata_never_cost_the_relay_its_session(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    """Each send may block max_block_ms; three in a row outlast the lease unless the relay
    keeps its session alive between them."""
    good = new_topic()
    tag = uuid.uuid4().hex[:8]
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(f"wedge{i}.{tag}", 1, 1) for i in range(3)])
    admin.close()
    box = Outbox()
    keys = [k for k in (f"bad{i}" for i in range(100))]
    chosen: dict[int, str] = {}
    for k in keys:  # three poisoned keys in three different shards
        chosen.setdefault(shard_of(k, 16), k)
    bad_keys = list(chosen.values())[:3]
    with Session(engine) as s, s.begin():
        for i, key in enumerate(bad_keys):
            box.publish(s, topic=f"wedge{i}_{tag}", key=key, type="Lost", payload={})
        for i in range(30):
            box.publish(s, topic=good, key=f"fine{i}", type="Fine", payload={})
    config = RelayConfig(db_url=db_url, lease_seconds=4, max_attempts=2, retry_base=0.05,
                         retry_max=0.1)
    publisher = make_publisher("kafka-python", KafkaSettings(kafka_bootstrap,
                                                             max_block_ms=2000))
    relay = Relay(config, lambda: publisher)
    deadline = time.monotonic() + 60
    try:
        while (_rows(engine) or len(_dead(engine)) < 3) and time.monotonic() < deadline:
            relay.step(wait=False)  # a lost session would raise here
    finally:
        relay._close()
    assert len(_dead(engine)) == 3 and _rows(engine) == []
