"""The idempotent consumer on real PostgreSQL and Kafka: each event's effect applied once.

The effect is a counter per event id (tests/integration/consumer_app.py), bumped in the
handler's session, so "exactly once" reads as "every counter is 1".
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient
from kafka.errors import CommitFailedError
from kafka.structs import TopicPartition
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session

from outbox import Event, IdempotentConsumer, _unsafe
from outbox.consumer import ConsumerRunner, consumer
from outbox.metrics import ConsumerMetrics
from outbox.serde import JsonSerializer
from tests.integration.consumer_app import COUNTER_DDL, bump

ROOT = Path(__file__).resolve().parents[2]
Headers = list[tuple[str, bytes]]
RawRecord = tuple[bytes | None, bytes | None, Headers]


# -- helpers -----------------------------------------------------------------------------

def make_events(topic: str, n: int, keys: int, start: int = 0) -> list[Event]:
    json_ = JsonSerializer()
    return [Event(topic=topic, key=f"k{i % keys}", type="Counted", payload={"i": i},
                  data=json_.dumps({"i": i})) for i in range(start, start + n)]


def produce(bootstrap: str, topic: str, records: list[RawRecord]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all",
                             linger_ms=5)
    try:
        for key, value, headers in records:
            producer.send(topic, key=key, value=value, headers=headers)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)


def produce_events(bootstrap: str, topic: str, events: list[Event]) -> None:
    produce(bootstrap, topic, [e.to_record() for e in events])


def read_topic(bootstrap: str, topic: str, expect: int, timeout: float = 30
               ) -> list[tuple[bytes | None, dict[str, bytes], bytes | None]]:
    reader = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                           enable_auto_commit=False, group_id=f"read-{uuid.uuid4().hex[:6]}")
    out: list[tuple[bytes | None, dict[str, bytes], bytes | None]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for records in reader.poll(timeout_ms=500).values():
                out.extend((r.key, dict(r.headers), r.value) for r in records)
        # anything beyond what we expect would show up within a short extra poll
        for records in reader.poll(timeout_ms=300).values():
            out.extend((r.key, dict(r.headers), r.value) for r in records)
    finally:
        reader.close()
    return out


def counters(engine: sa.Engine) -> dict[uuid.UUID, int]:
    with engine.connect() as c:
        return {r[0]: r[1] for r in c.execute(sa.text("SELECT event_id, n FROM counter"))}


def inbox_ids(engine: sa.Engine, group: str) -> set[uuid.UUID]:
    with engine.connect() as c:
        return {r[0] for r in c.execute(sa.text(
            "SELECT event_id FROM outbox_inbox WHERE consumer_group = :g"), {"g": group})}


def wait_for(what: str, predicate: Callable[[], bool], timeout: float,
             step: Callable[[], object] | None = None) -> None:
    """Call `step` (or sleep briefly) until `predicate()` holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        if step is not None:
            step()
        else:
            time.sleep(0.05)


def run_until(runner: ConsumerRunner, predicate: Callable[[], bool], what: str,
              timeout: float = 30) -> None:
    wait_for(what, predicate, timeout, step=lambda: runner.run_once(0.2))


@pytest.fixture
def counter_table(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as c:
        c.execute(sa.text(COUNTER_DDL))
    return engine


@pytest.fixture(params=["kafka-python", "confluent"])
def client(request: pytest.FixtureRequest) -> str:
    """The fault tests run on both Kafka clients."""
    return str(request.param)


@pytest.fixture
def runners() -> Iterator[list[ConsumerRunner]]:
    """Runners made by a test are closed after it, whatever happens."""
    made: list[ConsumerRunner] = []
    yield made
    for r in made:
        r.close()


def make_runner(made: list[ConsumerRunner], handler: IdempotentConsumer, db_url: str,
                kafka: str, **kw: object) -> ConsumerRunner:
    runner = ConsumerRunner(handler, db_url=db_url, kafka=kafka, session_timeout_ms=6000,
                            **kw)  # type: ignore[arg-type]
    made.append(runner)
    return runner


class CounterConsumer(IdempotentConsumer):
    def __init__(self, topic: str, group: str = "g") -> None:
        self.topics = [topic]
        self.group_id = group

    def handle(self, event: Event, session: Session) -> None:
        bump(session, event)


# -- processes ---------------------------------------------------------------------------

def start_consumer(target: str, db_url: str, kafka: str, topic: str, group: str,
                   log: Path, delay: float = 0.0, max_poll_records: int = 200,
                   client: str = "kafka-python") -> subprocess.Popen[bytes]:
    env = {**os.environ, "COUNTER_TOPICS": topic, "COUNTER_DELAY": str(delay),
           "OUTBOX_KAFKA_CLIENT": client,
           "OUTBOX_DATABASE_URL": db_url, "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka,
           "OUTBOX_GROUP_ID": group, "OUTBOX_MAX_POLL_RECORDS": str(max_poll_records),
           "OUTBOX_KAFKA_SESSION_TIMEOUT_MS": "6000", "PYTHONUNBUFFERED": "1"}
    env.pop("OUTBOX_UNSAFE_DISABLE", None)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "outbox.cli", "consume", target],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def committed_offsets(kafka: str, group: str) -> dict[TopicPartition, int]:
    admin = KafkaAdminClient(bootstrap_servers=kafka, client_id="outbox-tests")
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
        return {tp: om.offset for tp, om in offsets.items()}
    finally:
        admin.close()


def end_offsets(kafka: str, topic: str, partitions: int = 3) -> dict[TopicPartition, int]:
    probe = KafkaConsumer(bootstrap_servers=kafka)
    try:
        return dict(probe.end_offsets([TopicPartition(topic, p) for p in range(partitions)]))
    finally:
        probe.close()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15) -> tuple[int, float]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"consumer process {proc.pid} ignored SIGTERM for {timeout}s")
    return rc, time.monotonic() - started


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# -- acceptance: duplicates, two processes, one SIGKILLed --------------------------------

def test_two_processes_one_killed_apply_each_of_5000_duplicated_events_once(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,
    new_topic: Callable[..., str], processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    topic = new_topic(3)
    group = f"counter-{uuid.uuid4().hex[:6]}"
    events = make_events(topic, 5000, keys=97)
    rng = random.Random(5)
    # Each event 1 to 3 times; extra copies land a random 0..300 records later.
    records: list[RawRecord] = []
    later: list[tuple[int, Event]] = []
    for e in events:
        records.append(e.to_record())
        later += [(len(records) + rng.randint(0, 300), e) for _ in range(rng.randint(0, 2))]
        due = [x for x in later if x[0] <= len(records)]
        later = [x for x in later if x[0] > len(records)]
        records += [d.to_record() for _, d in due]
    records += [d.to_record() for _, d in later]
    assert len(records) > 8000
    produce(kafka_bootstrap, topic, records)

    def start(name: str) -> subprocess.Popen[bytes]:
        proc = start_consumer("tests.integration.consumer_app:Counter", db_url,
                              kafka_bootstrap, topic, group, tmp_path / f"{name}.log",
                              delay=0.0005)
        processes.append(proc)
        return proc

    def applied() -> tuple[int, int]:
        with counter_table.connect() as c:
            row = c.execute(sa.text("SELECT count(*), count(DISTINCT pid) FROM counter")).one()
        return int(row[0]), int(row[1])

    a, b = start("a"), start("b")
    # Both processes have applied events, and the work is far from done: kill one.
    wait_for("both consumers to apply events", lambda: applied()[1] == 2
             and applied()[0] >= 1000, 40)
    a.kill()
    a.wait()
    assert applied()[0] < 5000, "the kill came too late to test anything"
    a2 = start("a2")
    ends = end_offsets(kafka_bootstrap, topic)
    assert sum(ends.values()) == len(records)
    wait_for("the group to commit every offset",
             lambda: committed_offsets(kafka_bootstrap, group) == ends, 60,
             step=lambda: time.sleep(0.25))

    for proc in (b, a2):
        rc, _ = stop_process(proc)
        assert rc == 0, (tmp_path / "b.log").read_text()[-3000:]
    got = counters(counter_table)
    assert len(got) == 5000 and set(got) == {e.id for e in events}
    over = {k: n for k, n in got.items() if n != 1}
    assert not over, f"{len(over)} events applied more than once, e.g. {list(over.items())[:3]}"
    assert inbox_ids(counter_table, group) == set(got)


def test_sigterm_mid_stream_exits_0_promptly_and_commits_what_is_done(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,
    new_topic: Callable[..., str], processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    topic = new_topic(3)
    group = f"term-{uuid.uuid4().hex[:6]}"
    produce_events(kafka_bootstrap, topic, make_events(topic, 3000, keys=30))
    proc = start_consumer("tests.integration.consumer_app:Counter", db_url, kafka_bootstrap,
                          topic, group, tmp_path / "c.log", delay=0.002)
    processes.append(proc)

    def applied() -> int:
        with counter_table.connect() as c:
            return int(c.scalar(sa.text("SELECT count(*) FROM counter")) or 0)

    wait_for("the consumer to apply events", lambda: applied() >= 300, 40)
    rc, took = stop_process(proc)
    log = (tmp_path / "c.log").read_text()
    assert rc == 0, log[-3000:]
    assert took < 10, f"took {took:.1f}s to stop"
    done = applied()
    assert 0 < done < 3000
    assert max(counters(counter_table).values()) == 1
    # Offsets were committed for exactly what the database has: nothing lost, no gap.
    assert sum(committed_offsets(kafka_bootstrap, group).values()) == done
    assert "stopped:" in log


# -- poison, malformed, external, decorator ----------------------------------------------

def test_a_failing_event_is_retried_then_dead_lettered_and_the_rest_flows(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,
    new_topic: Callable[..., str], runners: list[ConsumerRunner], client: str
) -> None:
    topic = new_topic(3)
    events = make_events(topic, 60, keys=6)
    poison = events[17]
    calls: list[tuple[str, int]] = []

    class Poisoned(IdempotentConsumer):
        topics = (topic,)
        group_id = "poison"
        max_attempts = 3
        retry_backoff = 0.05

        def handle(self, event: Event, session: Session) -> None:
            calls.append((event.key, event.payload["i"]))
            if event.id == poison.id:
                raise RuntimeError("boom on purpose")
            bump(session, event)

    produce_events(kafka_bootstrap, topic, events)
    registry = CollectorRegistry()
    runner = make_runner(runners, Poisoned(), db_url, kafka_bootstrap,
                         metrics=ConsumerMetrics(registry), max_poll_records=20, client=client)
    run_until(runner, lambda: runner.stats.dead_lettered == 1 and runner.stats.processed == 59,
              "59 events applied and 1 dead-lettered")
    # consumption goes on
    more = make_events(topic, 10, keys=6, start=60)
    produce_events(kafka_bootstrap, topic, more)
    run_until(runner, lambda: runner.stats.processed == 69, "the events produced afterwards")

    got = counters(counter_table)
    assert set(got) == {e.id for e in events + more} - {poison.id}
    assert set(got.values()) == {1}
    assert calls.count((poison.key, 17)) == 3
    assert runner.stats.failed == 3
    # per key, first applications keep the partition's order despite the retries
    firsts: dict[str, list[int]] = defaultdict(list)
    for key, i in dict.fromkeys(calls):
        firsts[key].append(i)
    for key, seq in firsts.items():
        assert seq == sorted(seq), (key, seq)
    # the poison is recorded as processed, so the partition moved on for good
    assert poison.id in inbox_ids(counter_table, "poison")

    dead = read_topic(kafka_bootstrap, topic + ".dlq", expect=1)
    assert len(dead) == 1
    key, headers, value = dead[0]
    assert (key, value) == (poison.key.encode(), poison.data)
    assert headers["ce_id"] == str(poison.id).encode()
    assert headers["outbox_error"] == b"RuntimeError: boom on purpose"
    assert headers["outbox_reason"] == b"handler-failed"
    assert headers["outbox_original_topic"] == topic.encode()
    assert int(headers["outbox_original_partition"]) in range(3)
    assert int(headers["outbox_original_offset"]) >= 0

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("outbox_consumer_processed_total") == 69
    assert sample("outbox_consumer_failed_total") == 3
    assert sample("outbox_consumer_dead_lettered_total", reason="handler-failed") == 1
    lags = runner.update_lag()
    assert len(lags) == 3 and set(lags.values()) == {0}
    assert sample("outbox_consumer_lag", topic=topic, partition="0") == 0


def test_malformed_records_are_dead_lettered_with_a_reason(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,
    new_topic: Callable[..., str], runners: list[ConsumerRunner], client: str
) -> None:
    topic = new_topic(1)
    good = make_events(topic, 10, keys=3)
    no_id = (b"k0", b'{"i": -1}', [("ce_type", b"Counted")])
    not_json = (b"k0", b"not json{", [("ce_id", str(uuid.uuid4()).encode()),
                                       ("content-type", b"application/json")])
    records = [e.to_record() for e in good[:4]] + [no_id, not_json] + \
        [e.to_record() for e in good[4:]]
    produce(kafka_bootstrap, topic, records)
    runner = make_runner(runners, CounterConsumer(topic, "malformed"), db_url, kafka_bootstrap,
                         client=client)
    run_until(runner, lambda: runner.stats.processed == 10 and runner.stats.malformed == 2,
              "10 events applied and 2 malformed records dead-lettered")
    assert set(counters(counter_table).values()) == {1}
    assert len(counters(counter_table)) == 10
    dead = read_topic(kafka_bootstrap, topic + ".dlq", expect=2)
    assert [v for _, _, v in dead] == [b'{"i": -1}', b"not json{"]
    assert {h["outbox_reason"] for _, h, _ in dead} == {b"malformed"}
    assert b"no 'ce_id' header" in dead[0][1]["outbox_error"]
    assert b"cannot be decoded as application/json" in dead[1][1]["outbox_error"]
    assert [int(h["outbox_original_offset"]) for _, h, _ in dead] == [4, 5]


def test_external_mode_writes_the_dedupe_record_only_after_the_handler_succeeded(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,
    new_topic: Callable[..., str], runners: list[ConsumerRunner], client: str
) -> None:
    topic = new_topic(3)
    events = make_events(topic, 20, keys=4)
    flaky = events[5]
    sent: dict[uuid.UUID, int] = defaultdict(int)  # the "external system", keyed by event id
    seen_own_record: list[bool] = []

    class Mailer(IdempotentConsumer):
        topics = (topic,)
        group_id = "mailer"
        external = True
        max_attempts = 3
        retry_backoff = 0.05

        def handle(self, event: Event, session: Session) -> None:
            seen_own_record.append(bool(session.scalar(sa.text(
                "SELECT count(*) FROM outbox_inbox WHERE event_id = :id"), {"id": event.id})))
            if event.id == flaky.id and sent[flaky.id] == 0 and not calls_failed:
                calls_failed.append(event.id)
                raise ConnectionError("mail server unavailable")
            sent[event.id] += 1  # the side effect, with event.id as its idempotency key
            bump(session, event)

    calls_failed: list[uuid.UUID] = []
    produce_events(kafka_bootstrap, topic, events)
    runner = make_runner(runners, Mailer(), db_url, kafka_bootstrap, client=client)
    run_until(runner, lambda: runner.stats.processed == 20, "20 events handled")
    assert calls_failed == [flaky.id] and runner.stats.failed == 1
    assert not any(seen_own_record), "the dedupe record existed while the handler ran"
    assert dict(sent) == {e.id: 1 for e in events}
    assert set(counters(counter_table).values()) == {1}
    assert inbox_ids(counter_table, "mailer") == {e.id for e in events}
    # a redelivery of an id already handled is skipped
    produce_events(kafka_bootstrap, topic, [flaky, events[0]])
    run_until(runner, lambda: runner.stats.duplicates == 2, "2 redeliveries skipped")
    assert dict(sent) == {e.id: 1 for e in events}
    assert runner.stats.processed == 20


def test_the_decorator_form(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,
    new_topic: Callable[..., str], runners: list[ConsumerRunner]
) -> None:
    topic = new_topic(3)
    events = make_events(topic, 30, keys=5)
    produce_events(kafka_bootstrap, topic, events + events[:10])

    @consumer(topics=[topic], group_id="decorated", max_attempts=2)
    def project(event: Event, session: Session) -> None:
        bump(session, event)

    assert isinstance(project, IdempotentConsumer) and project.max_attempts == 2
    runner = make_runner(runners, project, db_url, kafka_bootstrap)
    run_until(runner, lambda: runner.stats.processed == 30 and runner.stats.duplicates == 10,
              "30 events applied and 10 duplicates skipped")
    assert set(counters(counter_table).values()) == {1}
    assert len(counters(counter_table)) == 30


# -- the dedupe record matters; redelivery; failures -------------------------------------

def test_copies_of_an_event_on_different_partitions_are_applied_once(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,
    new_topic: Callable[..., str], runners: list[ConsumerRunner]
) -> None:
    """A foreign producer may re-key a republished event: the id still decides."""
    topic = new_topic(3)
    events = make_events(topic, 40, keys=8)
    records = [e.to_record() for e in events]
    rekeyed = [(b"other-" + k, v, h) for k, v, h in records]  # other keys: other partitions
    produce(kafka_bootstrap, topic, records + rekeyed + records[:5])
    runner = make_runner(runners, CounterConsumer(topic, "rekeyed"), db_url, kafka_bootstrap)
    run_until(runner, lambda: runner.stats.processed + runner.stats.duplicates == 85,
              "all 85 records finished")
    assert runner.stats.processed == 40 and runner.stats.duplicates == 45
    got = counters(counter_table)
    assert len(got) == 40 and set(got.values()) == {1}


def test_without_the_dedupe_record_duplicates_are_applied_twice(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,
    new_topic: Callable[..., str], runners: list[ConsumerRunner]
) -> None:
    """The fault-injection switch shows what the exactly-once check would catch."""
    topic = new_topic(3)
    events = make_events(topic, 50, keys=5)
    produce_events(kafka_bootstrap, topic, [e for e in events for _ in range(2)])
    runner = make_runner(runners, CounterConsumer(topic, "nodedupe"), db_url, kafka_bootstrap)
    with _unsafe.disable("dedupe"):
        run_until(runner, lambda: runner.stats.processed == 100, "100 records handled")
    got = counters(counter_table)
    assert len(got) == 50 and max(got.values()) == 2
    assert inbox_ids(counter_table, "nodedupe") == set()


def test_a_lost_offset_commit_redelivers_and_the_dedupe_records_skip_it(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,
    new_topic: Callable[..., str], runners: list[ConsumerRunner],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As after a rebalance: the DB committed, the offset commit was refused."""
    topic = new_topic(3)
    events = make_events(topic, 100, keys=10)
    produce_events(kafka_bootstrap, topic, events)
    first = make_runner(runners, CounterConsumer(topic, "lost"), db_url, kafka_bootstrap)

    def refuse(*args: object, **kw: object) -> None:
        raise CommitFailedError("consumer was kicked out of the group")

    monkeypatch.setattr(first.kafka_consumer, "commit", refuse)
    run_until(first, lambda: first.stats.processed == 100, "100 events applied")
    assert "offset commit refused after a rebalance" in caplog.text
    first.close()
    second = make_runner(runners, CounterConsumer(topic, "lost"), db_url, kafka_bootstrap)
    run_until(second, lambda: second.stats.duplicates == 100, "100 redeliveries skipped")
    assert second.stats.processed == 0
    assert set(counters(counter_table).values()) == {1}


def test_a_connection_lost_mid_batch_retries_the_batch_without_counting_a_failure(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,
    new_topic: Callable[..., str], runners: list[ConsumerRunner], client: str
) -> None:
    topic = new_topic(1)
    events = make_events(topic, 50, keys=5)
    killed: list[int] = []

    class Fragile(IdempotentConsumer):
        topics = (topic,)
        group_id = "fragile"

        def handle(self, event: Event, session: Session) -> None:
            bump(session, event)
            if event.payload["i"] == 20 and not killed:
                killed.append(1)
                session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))

    produce_events(kafka_bootstrap, topic, events)
    runner = make_runner(runners, Fragile(), db_url, kafka_bootstrap, client=client)
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        wait_for("50 events applied", lambda: runner.stats.processed == 50, 30)
    finally:
        runner.stop()
        thread.join(15)
    assert not thread.is_alive()
    assert killed and runner.stats.failed == 0 and runner.stats.dead_lettered == 0
    got = counters(counter_table)
    assert len(got) == 50 and set(got.values()) == {1}


def test_kafka_unreachable_is_retried_without_crashing_and_stop_still_works(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    runner = ConsumerRunner(CounterConsumer("nowhere"), db_url=db_url, kafka="127.0.0.1:1",
                            kafka_config={"bootstrap_timeout_ms": 500})
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        wait_for("a warning about Kafka", lambda: "Kafka unavailable" in caplog.text, 20)
        time.sleep(1.5)  # several more failed attempts, inside one throttle interval
        assert thread.is_alive()
    finally:
        runner.stop()
        thread.join(15)
    assert not thread.is_alive()
    warnings = [r for r in caplog.records if "Kafka unavailable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_a_stalled_consumer_cannot_hold_its_batch_locked_forever(db_url: str) -> None:
    runner = ConsumerRunner(CounterConsumer("t", "stall"), db_url=db_url, kafka="127.0.0.1:1",
                            idle_tx_timeout=0.5)
    try:
        with runner.db.sessions() as session:
            assert session.scalar(sa.text("SHOW idle_in_transaction_session_timeout")) == "500ms"
            runner.db.inbox.claim(session.connection(), "stall", [uuid.uuid4()])
            time.sleep(1.5)  # stalled inside the transaction, past the timeout
            with pytest.raises(sa.exc.DBAPIError, match="idle-in-transaction timeout"):
                session.execute(sa.text("SELECT 1"))
            session.rollback()
        with runner.db.sessions() as session:  # the claim died with the session
            assert session.scalar(sa.text("SELECT count(*) FROM outbox_inbox")) == 0
    finally:
        runner.close()


def test_old_dedupe_records_of_the_group_are_purged_in_batches(
    counter_table: sa.Engine, db_url: str
) -> None:
    with counter_table.begin() as c:
        c.execute(sa.text(
            "INSERT INTO outbox_inbox (consumer_group, event_id, processed_at) "
            "SELECT g, gen_random_uuid(), now() - age FROM (VALUES "
            "('purged', interval '8 days', 2500), ('purged', interval '1 day', 5), "
            "('other', interval '30 days', 3)) v(g, age, n), generate_series(1, n)"))
    runner = ConsumerRunner(CounterConsumer("t", "purged"), db_url=db_url,
                            kafka="127.0.0.1:1", purge_batch=1000)
    try:
        assert runner.purge_inbox() == 2500
    finally:
        runner.close()
    with counter_table.connect() as c:
        left = dict(c.execute(sa.text(
            "SELECT consumer_group, count(*) FROM outbox_inbox GROUP BY 1")).all())
    assert left == {"purged": 5, "other": 3}
