"""The relay on real PostgreSQL and Kafka: delivery, per-key order, dead letters, shards."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import sqlalchemy as sa
from kafka import KafkaConsumer
from sqlalchemy.orm import Session, sessionmaker

from outbox import Outbox
from outbox.publisher import Delivery, InMemoryPublisher, KafkaPublisher, KafkaSettings
from outbox.relay import Relay, RelayConfig
from outbox.schema import tables
from outbox.testing import drain

Received = list[tuple[str, dict[str, bytes], bytes]]


def read_topic(bootstrap: str, topic: str, expect: int, timeout: float = 60) -> Received:
    """(key, headers, value) of every record, partition by partition in offset order."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=f"read-{uuid.uuid4().hex[:6]}",
                             consumer_timeout_ms=5000)
    out: Received = []
    deadline = time.monotonic() + timeout
    while len(out) < expect and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=1000).values():
            out.extend((r.key.decode(), dict(r.headers), r.value) for r in records)
    consumer.close()
    return out


def write_events(engine: sa.Engine, topic: str, n: int, keys: int) -> dict[str, list[str]]:
    box = Outbox()
    factory = sessionmaker(engine)
    per_key: dict[str, list[str]] = defaultdict(list)

    @box.transactional(factory)
    def write(session: Session, i: int) -> None:
        key = f"k{i % keys}"
        e = box.publish(session, topic=topic, key=key, type="Seq", payload={"i": i})
        per_key[key].append(str(e.id))

    for i in range(n):
        write(i)
    return per_key


def pending(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.scalar(sa.select(sa.func.count()).select_from(tables.events)) or 0)


def test_relay_delivers_every_event_in_per_key_order(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic()
    per_key = write_events(engine, topic, 600, keys=20)
    publisher = KafkaPublisher(KafkaSettings(kafka_bootstrap))
    try:
        assert drain(db_url, publisher) == 600
    finally:
        publisher.close()
    assert pending(engine) == 0
    got = read_topic(kafka_bootstrap, topic, 600)
    seen: dict[str, list[str]] = defaultdict(list)
    for key, headers, _ in got:
        seen[key].append(headers["ce_id"].decode())
        assert headers["ce_specversion"] == b"1.0" and headers["ce_type"] == b"Seq"
    assert dict(seen) == dict(per_key)


def test_a_record_the_broker_refuses_is_dead_lettered_and_others_flow(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic()
    box = Outbox(max_event_bytes=4 * 1024 * 1024)
    with Session(engine) as s, s.begin():
        box.publish(s, topic=topic, key="a", type="Small", payload={"n": 1})
        big = box.publish(s, topic=topic, key="a", type="Huge", payload="x" * (2 * 1024 * 1024))
        box.publish(s, topic=topic, key="a", type="Small", payload={"n": 2})
        box.publish(s, topic=topic, key="b", type="Small", payload={"n": 3})
    publisher = KafkaPublisher(KafkaSettings(kafka_bootstrap))
    try:
        assert drain(db_url, publisher) == 3
    finally:
        publisher.close()
    with engine.connect() as c:
        dead = c.execute(sa.select(tables.dead_letters)).all()
    assert [(d.event_id, d.type) for d in dead] == [(big.id, "Huge")]
    assert "TooLarge" in dead[0].error, dead[0].error
    got = read_topic(kafka_bootstrap, topic, 3)
    assert sorted(v for _, _, v in got) == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert pending(engine) == 0


def test_a_failed_send_is_retried_from_the_shards_first_unacknowledged_event(
    engine: sa.Engine, db_url: str
) -> None:
    write_events(engine, "t", 50, keys=1)
    failures = {"left": 3}

    def flaky(record: object) -> BaseException | None:
        if failures["left"] and b'"i":10}' in record.value:  # type: ignore[attr-defined]
            failures["left"] -= 1
            return ConnectionError("broker went away")
        return None

    publisher = InMemoryPublisher(fail=flaky)
    drain(db_url, publisher, config=RelayConfig(db_url=db_url, retry_base=0.01))
    values = [int(r.value.decode().split(":")[1].rstrip("}")) for r in publisher.records]
    firsts = list(dict.fromkeys(values))
    assert firsts == list(range(50)), "first deliveries must keep the key's order"
    assert failures["left"] == 0 and pending(engine) == 0


def test_relays_split_the_shards_and_take_over_when_one_stops(db_url: str) -> None:
    relays = [Relay(RelayConfig(db_url=db_url, poll_interval=0.2), InMemoryPublisher)
              for _ in range(3)]
    threads = [threading.Thread(target=r.run) for r in relays]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            owned = [set(r.owned_shards) for r in relays]
            if sorted(len(o) for o in owned) == [5, 5, 6] and len(set.union(*owned)) == 16:
                break
            time.sleep(0.2)
        assert sorted(len(o) for o in owned) == [5, 5, 6] and len(set.union(*owned)) == 16
        relays[0].stop()
        threads[0].join(15)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            owned = [set(r.owned_shards) for r in relays[1:]]
            if sorted(len(o) for o in owned) == [8, 8] and len(owned[0] | owned[1]) == 16:
                break
            time.sleep(0.2)
        assert sorted(len(o) for o in owned) == [8, 8] and not owned[0] & owned[1]
    finally:
        for r in relays:
            r.stop()
        for t in threads:
            t.join(15)


class _Stuck:
    def done(self) -> bool:
        return False

    def error(self) -> BaseException | None:
        return None


class StuckThenFine(InMemoryPublisher):
    """A producer that hangs (never acknowledges) until it is replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = True
        self.replaced = 0

    def send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
             ) -> Delivery:
        return _Stuck() if self.stuck else super().send(topic, key, value, headers)

    def recover(self) -> None:
        self.replaced += 1
        self.stuck = False


def test_a_stuck_producer_is_replaced_and_nothing_is_lost(
    engine: sa.Engine, db_url: str
) -> None:
    per_key = write_events(engine, "t", 40, keys=4)
    publisher = StuckThenFine()
    relay = Relay(RelayConfig(db_url=db_url, send_timeout=1.0), lambda: publisher)
    try:
        relay.step(wait=False)  # hangs for send_timeout, then replaces the producer
        assert publisher.replaced == 1 and pending(engine) == 40
        while relay.step(wait=False):
            pass
    finally:
        relay._drop_connection()
    assert pending(engine) == 0
    seen: dict[str, list[str]] = defaultdict(list)
    for r in publisher.records:
        seen[r.key.decode()].append(dict(r.headers)["ce_id"].decode())
    assert dict(seen) == dict(per_key)


def test_only_the_at_least_once_relay_commits_without_waiting_for_the_flush(
    db_url: str
) -> None:
    """Its commits are bookkeeping that a crash may only undo as a suffix (sent again,
    allowed); the exactly-once relay's deletes must be durable before the shard's next
    transaction (outbox.relay_session)."""
    from outbox.relay_session import open_session
    from outbox.store import Store

    seen = {}
    for exactly_once in (False, True):
        conn, _ = open_session(RelayConfig(db_url=db_url, exactly_once=exactly_once),
                               "test", Store(tables))
        try:
            row = conn.execute("SHOW synchronous_commit").fetchone()
            seen[exactly_once] = row[0] if row else None
            # the claim reads text as the server's bytes: they must be UTF-8
            assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        finally:
            conn.close()
    assert seen == {False: "off", True: "on"}
