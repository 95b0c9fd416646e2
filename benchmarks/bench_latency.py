"""Commit-to-ack latency at a steady 1,000 and 5,000 events/s, for each client.

One relay, woken by NOTIFY, runs in the same process as the writers (threads, paced to
the rate). At 1,000/s each transaction publishes one event. One Python process on this
2-core machine commits about 1,500 one-event transactions/s at best (the GIL; each
costs ~0.7 ms of CPU), so at 5,000/s each transaction publishes 5 events (1,000
transactions/s). The clock starts when the writer's commit returns
and stops in the producer's delivery callback (kafka-python: the future's callback on
its I/O thread; confluent: librdkafka's delivery report, served by the relay's flush).
The first WARMUP seconds are not counted. Every latency goes to bench.json and the CDF.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.common import Result, database, key, seconds, topics
from outbox import Outbox
from outbox.event import KafkaHeaders
from outbox.exactly_once import namespace
from outbox.progress import KafkaProgressLog, progress_topic
from outbox.publisher import Delivery, KafkaPublisher, KafkaSettings, Publisher
from outbox.relay import Relay, RelayConfig
from outbox.txn import TxnProducer, make_txn_producer

RATES = (1_000, 5_000)
WRITERS = {1_000: 4, 5_000: 4}  # threads: one commits about 700 transactions/s here
PER_TX = {1_000: 1, 5_000: 5}  # events per transaction
WARMUP = 2.0
SECONDS = seconds(10.0)
CLIENTS = ("kafka-python", "confluent")


def _event_id(headers: KafkaHeaders) -> str:
    return next(v for n, v in headers if n == "ce_id").decode()


class _Proxy:
    """The client's producer, with a timing hook on its send; all else passes through."""

    def __init__(self, inner: Any, acked: dict[str, float]) -> None:
        self._inner = inner
        self._acked = acked

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _TimedKafkaProducer(_Proxy):
    def send(self, topic: str, *args: Any, headers: KafkaHeaders, **kw: Any) -> Any:
        future = self._inner.send(topic, *args, headers=headers, **kw)
        eid, acked = _event_id(headers), self._acked
        future.add_callback(lambda _meta: acked.__setitem__(eid, time.monotonic()))
        return future


class _TimedConfluentProducer(_Proxy):
    def produce(self, topic: str, *args: Any, on_delivery: Callable[[Any, Any], None],
                headers: KafkaHeaders, **kw: Any) -> None:
        eid, acked = _event_id(headers), self._acked

        def report(error: Any, message: Any) -> None:
            if error is None:
                acked[eid] = time.monotonic()
            on_delivery(error, message)

        self._inner.produce(topic, *args, on_delivery=report, headers=headers, **kw)


def timed_publisher(client: str, settings: KafkaSettings,
                    acked: dict[str, float]) -> Publisher:
    """The client's real Publisher; only its producer is wrapped, to note ack times."""
    if client == "kafka-python":
        class TimedKafka(KafkaPublisher):
            def _make_producer(self) -> Any:
                return _TimedKafkaProducer(super()._make_producer(), acked)

        return TimedKafka(settings)
    from outbox.confluent import ConfluentPublisher

    class TimedConfluent(ConfluentPublisher):
        def _make_producer(self) -> Any:
            return _TimedConfluentProducer(super()._make_producer(), acked)

    return TimedConfluent(settings)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


class TimedTxn:
    """A transactional producer whose commit notes the ack time of the events it
    carried (the exactly-once relay's ack is its transaction's commit)."""

    def __init__(self, inner: TxnProducer, acked: dict[str, float]) -> None:
        self.inner, self.acked = inner, acked
        self.transactional_id = inner.transactional_id
        self._ids: list[str] = []

    def begin(self) -> None:
        self._ids = []
        self.inner.begin()

    def send(self, topic: str, key: bytes, value: bytes, headers: KafkaHeaders,
             partition: int | None = None) -> Delivery:
        if headers:
            self._ids.append(_event_id(headers))
        return self.inner.send(topic, key, value, headers, partition)

    def flush(self, timeout: float) -> None:
        self.inner.flush(timeout)

    def commit(self, timeout: float) -> None:
        self.inner.commit(timeout)
        now = time.monotonic()
        for eid in self._ids:
            self.acked[eid] = now

    def abort(self, timeout: float) -> None:
        self.inner.abort(timeout)

    def close(self, timeout: float) -> None:
        self.inner.close(timeout)


def latency_relay(url: str, kafka: str, client: str, acked: dict[str, float],
                  exactly_once: bool) -> Relay:
    """A relay whose acks are timed into `acked`; with `exactly_once`, the one
    `outbox relay --exactly-once` makes."""
    settings = KafkaSettings(kafka, linger_ms=0)
    publisher = timed_publisher(client, settings, acked)
    config = RelayConfig(db_url=url, poll_interval=1.0, exactly_once=exactly_once)
    if not exactly_once:
        return Relay(config, lambda: publisher)
    return Relay(config, lambda: publisher, transactions=lambda tid: TimedTxn(
        make_txn_producer(client, settings, tid, int(config.lease_seconds * 1000)), acked),
        progress=KafkaProgressLog(settings, progress_topic(namespace(url, "outbox"))))


class PacedWriter:
    """Writer threads committing `rate` events/s (PER_TX[rate] per transaction) through
    `@box.transactional`, as service code does. `committed` maps each event id to
    `clock()` when its commit returned; `started`/`ended` bound the run."""

    def __init__(self, url: str, topic: str, rate: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url, self.topic, self.rate, self.clock = url, topic, rate, clock
        self.committed: dict[str, float] = {}
        self.started = self.ended = 0.0

    def run(self) -> None:
        writers, per = WRITERS[self.rate], PER_TX[self.rate]
        tx_rate = self.rate / per
        total = int(tx_rate * (WARMUP + SECONDS))
        engine = sa.create_engine(self.url, pool_size=writers)
        box = Outbox(notify="auto")
        topic, clock, committed = self.topic, self.clock, self.committed

        @box.transactional(sessionmaker(engine))
        def write(session: Session, j: int) -> list[str]:
            return [str(box.publish(session, topic=topic, key=key(i), type="OrderPlaced",
                                    payload={"id": i, "amount": 42, "currency": "EUR"}).id)
                    for i in range(j * per, (j + 1) * per)]

        def writer(w: int, started: float) -> None:
            for j in range(w, total, writers):
                delay = started + j / tx_rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                eids = write(j)
                now = clock()
                for eid in eids:
                    committed[eid] = now

        try:
            started = time.monotonic()
            self.started = clock()
            threads = [threading.Thread(target=writer, args=(w, started))
                       for w in range(writers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.ended = clock()
        finally:
            engine.dispose()

    def counted(self) -> dict[str, float]:
        """The events committed after the warm-up, with their commit times."""
        return {e: t for e, t in self.committed.items() if t >= self.started + WARMUP}

    def reached(self) -> float:
        """The rate the writers reached after the warm-up, events/s."""
        return len(self.counted()) / (self.ended - self.started - WARMUP)


def measure(url: str, kafka: str, topic: str, client: str, rate: int,
            exactly_once: bool = False) -> tuple[list[float], float, int]:
    """(latencies in ms of the counted events, the rate reached, events not acked)."""
    acked: dict[str, float] = {}
    relay = latency_relay(url, kafka, client, acked, exactly_once)
    runner = threading.Thread(target=relay.run, name="relay")
    writes = PacedWriter(url, topic, rate)
    runner.start()
    try:
        time.sleep(3)  # the relay takes its shards and falls asleep
        writes.run()
        deadline = time.monotonic() + 30
        while len(acked) < len(writes.committed) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        relay.stop()
        runner.join(30)
    counted = writes.counted()
    latencies = [(acked[e] - t) * 1000 for e, t in counted.items() if e in acked]
    return latencies, writes.reached(), len(counted) - len(latencies)


def run(db_url: str, kafka: str) -> list[Result]:
    results = []
    with topics(kafka) as new:
        for client in CLIENTS:
            for rate in RATES:
                with database(db_url) as url:
                    latencies, reached, missing = measure(url, kafka, new("latency"),
                                                          client, rate)
                if not latencies:
                    raise RuntimeError(f"latency {client} {rate}/s: no event acknowledged")
                note = (f"reached {reached:,.0f}/s, {PER_TX[rate]} per tx, {WRITERS[rate]} "
                        f"writer threads, {len(latencies):,} events, linger.ms=0")
                if missing:
                    note += f", {missing} NOT ACKED in 30s"
                label = f"commit-to-ack, {client}, {rate:,}/s"
                print(f"   {label}: p50 {percentile(latencies, 50):.1f} ms, "
                      f"p99 {percentile(latencies, 99):.1f} ms ({note})", flush=True)
                results.append(Result(f"{label}, p50", percentile(latencies, 50), "ms",
                                      note=note, samples=latencies))
                results.append(Result(
                    f"{label}, p99", percentile(latencies, 99), "ms", note=note,
                    target=("<=", 10.0) if (client, rate) == ("confluent", 1_000) else None))
    return results
