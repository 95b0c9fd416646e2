"""Consumer throughput against its fair ceilings (issue 11's targets), all measured in
this run on the same topic (common.record: 1,000 keys, a ~40-byte JSON value, the six
CloudEvents headers, 6 partitions), each by a new consumer group reading it from the
beginning:

- the raw consumers of both clients (bench_relay's: read only, no commits, no database);
- the fair ceilings: a hand-rolled at-least-once consumer per client, one database
  transaction per poll batch with one `executemany` of one row per event into
  `bench_sink` (the id from the ce_id header, a number from the JSON value), the
  offsets committed after the database commit;
- what to read the runner's ratios against: the confluent ceiling with the same deduplication
  (the batch's ids inserted first, in one statement), and the kafka-python one with one
  INSERT per event (the ceiling of a handler that sends a statement per event);
- `outbox consume`'s runner writing the same rows: `handle_batch` with dedupe on
  confluent-kafka (target >= 0.8x the confluent ceiling), a per-event `handle` with
  dedupe on kafka-python (target >= 0.6x the kafka-python ceiling), written both ways a
  handler writes rows (`session.add`, which the unit of work inserts together at the
  commit, and one `session.execute` per event), and the latter without the dedupe
  record (fault-injection switch, never for production) to show what deduplication
  itself costs;
- the runner with a handler that does nothing (dedupe on), per client (target >= 0.5x
  that client's raw consumer).

Every consumer reads POLL_BATCH records per poll (the runner's max_poll_records), uses
the same psycopg + SQLAlchemy engine and the same INSERT. Each rate is measured from
the first record received to the last one committed, so the group join is not counted.
`bench_sink` and the dedupe records are emptied before each measurement.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from benchmarks.bench_relay import consumer_confluent, consumer_kafka_python
from benchmarks.common import Result, database, record, sized, topics
from outbox import Event, IdempotentConsumer, _unsafe
from outbox.confluent import producer_config
from outbox.consumer import ConsumerRunner
from outbox.consumer.inbox import PostgresInbox
from outbox.publisher import KafkaSettings
from outbox.schema import tables

EVENTS = sized(100_000)
POLL_BATCH = 1_000  # records per poll (and per transaction), for every consumer here
TIMEOUT = 300.0
_SINK = sa.text("INSERT INTO bench_sink (event_id, i) VALUES (:id, :i)")
_INBOX = PostgresInbox(tables)
Row = dict[str, Any]


# -- the topic ---------------------------------------------------------------------------

def produce(kafka: str, topic: str, n: int = EVENTS) -> None:
    """n records (common.record) with confluent-kafka's producer, the relay's settings."""
    from confluent_kafka import Producer

    now = datetime.now(UTC)
    errors: list[Any] = []

    def on_delivery(error: Any, message: Any) -> None:
        if error is not None:
            errors.append(error)

    producer = Producer({**producer_config(KafkaSettings(kafka)),
                         "client.id": "outbox-bench-consumer"})
    for i in range(n):
        rec: tuple[bytes, bytes, Any] = record(i, now)  # (confluent's stubs: headers)
        k, v, h = rec
        while True:
            try:
                producer.produce(topic, v, k, on_delivery=on_delivery, headers=h)
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                producer.poll(0.05)
        if i % 1000 == 999:
            producer.poll(0)
    left = producer.flush(TIMEOUT)
    if left or errors:
        raise RuntimeError(f"producing the consumer benchmark's topic: {left} unflushed, "
                           f"errors {errors[:3]}")


# -- the fair ceilings: hand-rolled at-least-once consumers ------------------------------

def _row(headers: Any, value: bytes | None) -> Row:
    """The row a consumer writes for one record: its event id and the value's number."""
    for name, v in headers or ():
        if name == "ce_id":
            return {"id": uuid.UUID(v.decode()), "i": json.loads(value or b"{}")["id"]}
    raise ValueError("a record without a ce_id header")


@contextmanager
def _sink(url: str, per_event: bool = False, dedupe: bool = False
          ) -> Iterator[Callable[[list[Row]], None]]:
    """`apply(rows)`: one transaction, one executemany (the engine connects lazily, as
    the runner's does). `per_event`: one execute per row instead. `dedupe`: first the
    runner's own claim of the batch's ids (PostgresInbox.claim, one statement), and
    only the new ones written (what that deduplication costs a hand-rolled consumer)."""
    engine = sa.create_engine(url)

    def apply(rows: list[Row]) -> None:
        with engine.begin() as conn:
            if dedupe:
                new = _INBOX.claim(conn, "hand-rolled", [r["id"] for r in rows])
                if len(new) < len(rows):
                    rows = [r for r in rows if r["id"] in new]
            if per_event:
                for r in rows:
                    conn.execute(_SINK, r)
            elif rows:
                conn.execute(_SINK, rows)

    try:
        yield apply
    finally:
        engine.dispose()


def hand_rolled_kafka_python(url: str, kafka: str, topic: str, n: int = EVENTS,
                             per_event: bool = False) -> float:
    """kafka-python: poll, one transaction for the batch's rows, then commit offsets.
    `per_event`: one INSERT per event instead of one executemany (the ceiling of a handler
    that sends one statement per event)."""
    from kafka import KafkaConsumer

    group = f"hand-kp-{uuid.uuid4().hex[:6]}"  # each run reads the topic from the start
    reader = KafkaConsumer(topic, bootstrap_servers=kafka, group_id=group,
                           enable_auto_commit=False, auto_offset_reset="earliest",
                           max_poll_records=POLL_BATCH)
    done, started = 0, 0.0
    deadline = time.monotonic() + TIMEOUT
    try:
        with _sink(url, per_event) as apply:
            while done < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"hand-rolled kafka-python consumer: {done} of {n}")
                batch = reader.poll(timeout_ms=500)
                if not batch:
                    continue
                if not started:
                    started = time.monotonic()
                rows = [_row(r.headers, r.value) for records in batch.values()
                        for r in records]
                apply(rows)
                reader.commit()  # after the database commit: at least once
                done += len(rows)
            return done / (time.monotonic() - started)
    finally:
        reader.close(autocommit=False)


def hand_rolled_confluent(url: str, kafka: str, topic: str, n: int = EVENTS,
                          dedupe: bool = False) -> float:
    """confluent-kafka: consume, one transaction for the batch's rows, then a synchronous
    commit of the consumed offsets. It asks for no more than what is left, so the last
    consume does not wait out its timeout for records that will never come. `dedupe`:
    see _sink."""
    from confluent_kafka import Consumer

    group = f"hand-cf-{uuid.uuid4().hex[:6]}"  # each run reads the topic from the start
    reader = Consumer({"bootstrap.servers": kafka, "group.id": group,
                       "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    reader.subscribe([topic])
    done, started = 0, 0.0
    deadline = time.monotonic() + TIMEOUT
    try:
        with _sink(url, dedupe=dedupe) as apply:
            while done < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"hand-rolled confluent consumer: {done} of {n}")
                messages = reader.consume(min(POLL_BATCH, n - done), 0.5)
                rows = [_row(m.headers(), m.value()) for m in messages if m.error() is None]
                if not rows:
                    continue
                if not started:
                    started = time.monotonic()
                apply(rows)
                reader.commit(asynchronous=False)  # after the database commit
                done += len(rows)
            return done / (time.monotonic() - started)
    finally:
        reader.close()


# -- outbox consume's runner ----------------------------------------------------------------

class _Consumer(IdempotentConsumer):
    def __init__(self, topic: str, group: str) -> None:
        self.topics = [topic]
        self.group_id = group


class Rows(_Consumer):
    """One row per event, one statement per event."""

    def handle(self, event: Event, session: Session) -> None:
        session.execute(_SINK, {"id": event.id, "i": event.payload["id"]})


class _Base(DeclarativeBase):
    pass


class SinkRow(_Base):
    __tablename__ = "bench_sink"
    event_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    i: Mapped[int]


class OrmRows(_Consumer):
    """One row per event, the ORM way: the session's unit of work inserts the batch's
    rows together when the runner commits."""

    def handle(self, event: Event, session: Session) -> None:
        session.add(SinkRow(event_id=event.id, i=event.payload["id"]))


class BatchRows(_Consumer):
    """One row per event, one executemany per batch (as the hand-rolled consumers)."""

    def handle_batch(self, events: list[Event], session: Session) -> None:
        session.execute(_SINK, [{"id": e.id, "i": e.payload["id"]} for e in events])


class Nothing(_Consumer):
    """A handler that does nothing: what the runner itself costs."""

    def handle(self, event: Event, session: Session) -> None:
        pass


def runner_rate(url: str, kafka: str, consumer: IdempotentConsumer, client: str,
                n: int = EVENTS) -> float:
    """The runner driven as run() drives it (poll, process, housekeeping) until n events
    are processed."""
    runner = ConsumerRunner(consumer, db_url=url, kafka=kafka, client=client,
                            max_poll_records=POLL_BATCH)
    done, started = 0, 0.0
    deadline = time.monotonic() + TIMEOUT
    try:
        while done < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{type(consumer).__name__} on {client}: {done} of {n} "
                                   f"({runner.stats})")
            batch = runner.poll(0.5)  # run_once(), with the clock started in between
            if batch:
                if not started:
                    started = time.monotonic()
                done += runner.process(batch)
            runner.loop.run_chores(time.monotonic())
        elapsed = time.monotonic() - started
    finally:
        runner.close()
    s = runner.stats
    if (s.processed, s.duplicates, s.failed, s.dead_lettered) != (n, 0, 0, 0):
        raise RuntimeError(f"{type(consumer).__name__} on {client}: expected {n} events "
                           f"processed and nothing else, got {s}")
    return n / elapsed


# -- the run --------------------------------------------------------------------------------

def _reset(engine: sa.Engine) -> None:
    with engine.begin() as c:
        c.execute(sa.text("TRUNCATE bench_sink, outbox_inbox, outbox_attempts"))


def _check(engine: sa.Engine, what: str, rows: int) -> None:
    with engine.connect() as c:
        got = int(c.scalar(sa.text("SELECT count(*) FROM bench_sink")) or 0)
    if got != rows:
        raise RuntimeError(f"{what}: {got} rows in bench_sink, expected {rows}")


def run(db_url: str, kafka: str) -> list[Result]:
    with topics(kafka) as new, database(db_url) as url:
        topic = new("consumer")
        produce(kafka, topic)
        engine = sa.create_engine(url)
        try:
            with engine.begin() as c:
                c.execute(sa.text("CREATE TABLE bench_sink (event_id uuid PRIMARY KEY, "
                                  "i bigint NOT NULL)"))

            def measure(what: str, rows: int, rate: Callable[[], float]) -> float:
                _reset(engine)
                got = rate()
                _check(engine, what, rows)
                return got

            def group(name: str) -> str:
                return f"bench-{name}-{uuid.uuid4().hex[:6]}"

            raw_kp = consumer_kafka_python(kafka, topic, EVENTS)
            raw_cf = consumer_confluent(kafka, topic, EVENTS)
            hand_kp = measure("hand-rolled kafka-python", EVENTS,
                              lambda: hand_rolled_kafka_python(url, kafka, topic))
            hand_cf = measure("hand-rolled confluent", EVENTS,
                              lambda: hand_rolled_confluent(url, kafka, topic))
            hand_cf_seen = measure("hand-rolled confluent + dedupe", EVENTS,
                                   lambda: hand_rolled_confluent(url, kafka, topic,
                                                                 dedupe=True))
            hand_kp_each = measure("hand-rolled kafka-python, one execute per event", EVENTS,
                                   lambda: hand_rolled_kafka_python(url, kafka, topic,
                                                                    per_event=True))
            batch_cf = measure("handle_batch, confluent", EVENTS, lambda: runner_rate(
                url, kafka, BatchRows(topic, group("batch-cf")), "confluent"))
            orm_kp = measure("handle (ORM), kafka-python", EVENTS, lambda: runner_rate(
                url, kafka, OrmRows(topic, group("orm-kp")), "kafka-python"))
            each_kp = measure("handle, kafka-python", EVENTS, lambda: runner_rate(
                url, kafka, Rows(topic, group("each-kp")), "kafka-python"))
            with _unsafe.disable("dedupe"):
                bare_kp = measure("handle without dedupe, kafka-python", EVENTS,
                                  lambda: runner_rate(url, kafka, Rows(topic, group("bare-kp")),
                                                      "kafka-python"))
            noop_kp = measure("no-op handler, kafka-python", 0, lambda: runner_rate(
                url, kafka, Nothing(topic, group("noop-kp")), "kafka-python"))
            noop_cf = measure("no-op handler, confluent", 0, lambda: runner_rate(
                url, kafka, Nothing(topic, group("noop-cf")), "confluent"))
        finally:
            engine.dispose()
    note = f"{EVENTS:,} events, 6 partitions, {POLL_BATCH:,} per poll"
    tx = "1 transaction + 1 executemany per poll, offsets committed after it"
    return [
        Result("hand-rolled consumer, kafka-python", hand_kp, "events/s",
               "raw kafka-python consumer", raw_kp,
               note=f"{tx}: the fair ceiling; {note}"),
        Result("hand-rolled consumer, confluent-kafka", hand_cf, "events/s",
               "raw confluent consumer", raw_cf, note=f"{tx}: the fair ceiling; {note}"),
        Result("hand-rolled + dedupe, confluent", hand_cf_seen, "events/s",
               "hand-rolled, confluent", hand_cf,
               note=f"the batch's ids inserted first, one statement: what deduplication "
                    f"costs a consumer that claims as the runner does; {note}"),
        Result("consume: handle_batch + dedupe, confluent", batch_cf, "events/s",
               "hand-rolled, confluent", hand_cf, note=note, target=(">=", 0.8)),
        Result("consume: handle (ORM add) + dedupe, kafka-python", orm_kp, "events/s",
               "hand-rolled, kafka-python", hand_kp,
               note=f"session.add per event, inserted together at the commit; {note}",
               target=(">=", 0.6)),
        Result("consume: handle (1 execute) + dedupe, kafka-python", each_kp, "events/s",
               "hand-rolled, kafka-python", hand_kp,
               note=f"one statement per event: bounded by the next line; {note}",
               target=(">=", 0.6)),
        Result("hand-rolled, 1 execute per event, kafka-python", hand_kp_each, "events/s",
               "hand-rolled, kafka-python", hand_kp,
               note=f"one round trip per event: the ceiling of that handler; {note}"),
        Result("consume: handle (1 execute) / its ceiling", each_kp, "events/s",
               "hand-rolled, 1 execute per event", hand_kp_each, note=note),
        Result("consume: dedupe cost (with / without)", each_kp, "events/s",
               "same, dedupe off (unsafe)", bare_kp, note=f"handle, kafka-python; {note}"),
        Result("consume: no-op handler, kafka-python", noop_kp, "events/s",
               "raw kafka-python consumer", raw_kp, note=f"dedupe on; {note}",
               target=(">=", 0.5)),
        Result("consume: no-op handler, confluent", noop_cf, "events/s",
               "raw confluent consumer", raw_cf, note=f"dedupe on; {note}",
               target=(">=", 0.5)),
    ]
