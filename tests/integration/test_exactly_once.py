"""The exactly-once relay on real PostgreSQL and Kafka: transactions fenced per shard.

A read_committed consumer must see every event once, in per-key order, even when a
relay dies between Kafka's commit and the row deletion (the window that makes the
default relay send again), and a zombie relay must be fenced out.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from kafka import KafkaConsumer

from outbox import _unsafe
from outbox.exactly_once import namespace
from outbox.progress import KafkaProgressLog, progress_topic
from outbox.publisher import CLIENTS, KafkaSettings, make_publisher
from outbox.relay import Relay, RelayConfig
from outbox.txn import Fenced, OpenTransaction, make_txn_producer
from tests.integration.procs import RelayProcess
from tests.integration.test_relay import pending, write_events


def read_committed(bootstrap: str, topic: str, at_least: int,
                   quiet_polls: int = 3) -> list[tuple[str, str]]:
    """(key, event id) of every committed record, partition by partition in order."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=f"eos-{uuid.uuid4().hex[:6]}",
                             isolation_level="read_committed")
    out: list[tuple[str, str]] = []
    quiet = 0
    while quiet < quiet_polls or len(out) < at_least:
        batch = consumer.poll(timeout_ms=1000)
        quiet = 0 if batch else quiet + 1
        if quiet > 60:
            break
        for records in batch.values():
            out.extend((r.key.decode(), dict(r.headers)["ce_id"].decode()) for r in records)
    consumer.close()
    return out


def assert_once_in_key_order(bootstrap: str, topic: str,
                             per_key: dict[str, list[str]]) -> None:
    """read_committed sees every written event once, each key's in the order written."""
    n = sum(len(ids) for ids in per_key.values())
    got = read_committed(bootstrap, topic, n)
    ids = [eid for _, eid in got]
    assert len(ids) == len(set(ids)) == n
    for key, expected in per_key.items():
        assert [eid for k, eid in got if k == key] == expected


def eos_relay(db_url: str, kafka: str, client: str) -> Relay:
    """The relay `outbox relay --exactly-once` makes (each test database has its own
    name, so its own transactional ids and progress topic)."""
    settings = KafkaSettings(kafka)
    return Relay(
        RelayConfig(db_url=db_url, exactly_once=True, lease_seconds=5, relay_id="eos"),
        lambda: make_publisher(client, settings),
        transactions=lambda tid: make_txn_producer(client, settings, tid, 5000),
        progress=KafkaProgressLog(settings, progress_topic(namespace(db_url, "outbox"))))


def drain(relay: Relay, engine: sa.Engine, timeout: float = 90) -> None:
    import time

    deadline = time.monotonic() + timeout
    while pending(engine) and time.monotonic() < deadline:
        relay.step(wait=False)
    assert pending(engine) == 0, "the relay did not drain the outbox"


@pytest.mark.parametrize("client", CLIENTS)
def test_each_event_once_in_key_order(engine: sa.Engine, db_url: str, kafka_bootstrap: str,
                                      new_topic: Callable[..., str], client: str) -> None:
    topic = new_topic()
    per_key = write_events(engine, topic, 400, keys=17)
    relay = eos_relay(db_url, kafka_bootstrap, client)
    try:
        drain(relay, engine)
    finally:
        relay.stop()
        relay._close()
    assert_once_in_key_order(kafka_bootstrap, topic, per_key)


def test_a_truncation_between_drains_keeps_each_event_once_in_key_order(
        engine: sa.Engine, db_url: str, kafka_bootstrap: str,
        new_topic: Callable[..., str]) -> None:
    """The idle relay truncates the drained table (outbox.reclaim); the transactions,
    progress records and cursors of the next drain do not notice."""
    topic = new_topic()
    first = write_events(engine, topic, 200, keys=17)
    relay = eos_relay(db_url, kafka_bootstrap, "kafka-python")
    relay.reclaimer.above_bytes, relay.reclaimer.every = 1, 0.0
    try:
        drain(relay, engine)
        with engine.connect() as c:
            c.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                "VACUUM outbox_events")
        relay.step(wait=True)
        assert relay.reclaimer.reclaimed == 1
        second = write_events(engine, topic, 200, keys=17)
        drain(relay, engine)
    finally:
        relay.stop()
        relay._close()
    assert_once_in_key_order(kafka_bootstrap, topic,
                             {key: first[key] + second[key] for key in first})


def _crash_then_finish(db_url: str, kafka: str, topic: str, engine: sa.Engine,
                       tmp_path: Path, env: dict[str, str]) -> Counter[str]:
    """A relay process that exits between Kafka's commit (or ack) and the deletion of its
    first batch; then a second relay finishes the outbox. Returns each id's copies."""
    first = RelayProcess(db_url, kafka, tmp_path, "first",
                         {**env, "OUTBOX_FAULT_CRASH": "relay.after_ack:1"})
    assert first.proc is not None
    assert first.proc.wait(60) == 86, first.output()
    assert pending(engine) == 300  # nothing deleted: the crash came before the delete
    second = RelayProcess(db_url, kafka, tmp_path, "second", env)
    try:
        import time

        deadline = time.monotonic() + 60
        while pending(engine) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pending(engine) == 0, second.output()
    finally:
        second.terminate()
    return Counter(eid for _, eid in read_committed(kafka, topic, 300))


@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once", "exactly-once, UNSAFE"])
def test_a_relay_killed_between_commit_and_delete(
        engine: sa.Engine, db_url: str, kafka_bootstrap: str, new_topic: Callable[..., str],
        tmp_path: Path, mode: str) -> None:
    topic = new_topic()
    write_events(engine, topic, 300, keys=10)
    env: dict[str, str] = {}
    if mode.startswith("exactly-once"):
        env["OUTBOX_EXACTLY_ONCE"] = "1"
    if mode.endswith("UNSAFE"):
        env["OUTBOX_UNSAFE_DISABLE"] = "progress"
    copies = _crash_then_finish(db_url, kafka_bootstrap, topic, engine, tmp_path, env)
    assert len(copies) == 300  # none lost in any mode
    duplicates = sum(n - 1 for n in copies.values())
    if mode == "exactly-once":
        assert duplicates == 0
    else:  # the first relay's committed batch is sent again
        assert duplicates > 0


def test_a_zombie_is_fenced_and_sends_nothing_more(
        engine: sa.Engine, db_url: str, kafka_bootstrap: str,
        new_topic: Callable[..., str]) -> None:
    settings = KafkaSettings(kafka_bootstrap)
    tid = f"outbox-test-shard-0-{uuid.uuid4().hex[:6]}"
    topic = new_topic(partitions=1)
    zombie = make_txn_producer("kafka-python", settings, tid, 5000)
    zombie.begin()
    zombie.send(topic, b"k", b"from the zombie", [("ce_id", b"zombie")])
    successor = make_txn_producer("kafka-python", settings, tid, 5000)  # fences it
    with pytest.raises(Fenced):
        zombie.commit(5)
    successor.begin()
    successor.send(topic, b"k", b"from the successor", [("ce_id", b"successor")])
    successor.commit(5)
    assert [eid for _, eid in read_committed(kafka_bootstrap, topic, 1)] == ["successor"]
    zombie.close(1)
    successor.close(1)


def test_unsafe_progress_is_a_known_mechanism() -> None:
    with _unsafe.disable("progress"):
        assert _unsafe.disabled("progress")


def test_an_open_transaction_on_a_progress_partition_holds_the_takeover_back(
        kafka_bootstrap: str) -> None:
    """A relay reads a shard's progress only once no transaction is open on its
    partition: a record below an open transaction's first offset may not be the last
    (if that transaction ever commits, its events would be sent twice). It waits a
    moment for the transaction to end, then refuses the shard (OpenTransaction)."""
    import threading

    settings = KafkaSettings(kafka_bootstrap)
    run = uuid.uuid4().hex[:6]
    progress = KafkaProgressLog(settings, f"outbox-test-{run}-progress", open_wait=3)
    progress.prepare(2)
    first = make_txn_producer("kafka-python", settings, f"test-{run}-a", 30_000)
    first.begin()
    progress.record(first, 0, [(1, "e1")], "r")
    first.flush(5)
    first.commit(5)
    other = make_txn_producer("kafka-python", settings, f"test-{run}-b", 30_000)
    try:
        other.begin()
        sent = progress.record(other, 0, [(2, "e2")], "r")
        other.flush(5)
        assert sent.done() and sent.error() is None
        with pytest.raises(OpenTransaction, match="hanging transaction"):
            progress.last(0)
        assert progress.last(1) == []  # the other shard's partition has none open
        # ended while the reader waits: the reader sees its record, the last one
        committed: list[BaseException | None] = []

        def commit() -> None:
            try:
                other.commit(10)
                committed.append(None)
            except BaseException as exc:
                committed.append(exc)

        timer = threading.Timer(1.0, commit)
        timer.start()
        assert progress.last(0) == [(2, "e2")]
        timer.join(15)
        assert committed == [None]
    finally:
        other.close(1)
        first.close(1)
        progress.close()
