"""What `--exactly-once` costs, beside the same relay without it, in one run (confluent
client, the fast lane; the same records as bench_relay):

- the drain rate of a 100,000-event backlog, as a ratio to the default relay's;
- commit-to-ack latency at 1,000 events/s (bench_latency's writers and clock; the ack
  of an exactly-once event is its transaction's commit);
- the floor of that latency: raw confluent-kafka transactional producers, one per
  shard, run in the relay's round shape at the same rate, with no database (events are
  made in the bench process, each stamped when made, and acked at its transaction's
  commit). What the relay does beyond Kafka's transactions is not in it, so it is a
  floor for the relay's latency on this machine, not a target.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from benchmarks.bench_latency import SECONDS, WARMUP, measure, percentile
from benchmarks.common import (
    Result,
    Topics,
    close,
    database,
    drain,
    fill,
    key,
    record,
    relay_for,
    sized,
    topics,
)
from outbox.confluent import producer_config
from outbox.exactly_once import namespace
from outbox.keys import shard_of
from outbox.progress import KafkaProgressLog, progress_topic
from outbox.publisher import KafkaSettings, make_publisher
from outbox.relay import Relay, RelayConfig
from outbox.shardcount import DEFAULT_SHARDS
from outbox.txn import make_txn_producer

EVENTS = sized(100_000)
CLIENT = "confluent"
RATE = 1_000


def eos_relay_for(url: str, kafka: str, topic: str) -> Relay:
    """The relay `outbox relay --exactly-once` makes, warmed up as common.relay_for
    warms the default one (its shards taken, producers made, one event relayed)."""
    settings = KafkaSettings(kafka)
    config = RelayConfig(db_url=url, exactly_once=True)
    relay = Relay(config, lambda: make_publisher(CLIENT, settings),
                  transactions=lambda tid: make_txn_producer(
                      CLIENT, settings, tid, int(config.lease_seconds * 1000)),
                  progress=KafkaProgressLog(settings, progress_topic(namespace(url, "outbox"))))
    fill(url, topic, 1)
    drain(relay, 1)
    return relay


@contextlib.contextmanager
def eos_database(db_url: str, new: Topics) -> Iterator[str]:
    """common.database, whose exactly-once relays' progress topic (each fresh database
    names its own, exactly_once.namespace) `new` deletes with the run's topics."""
    with database(db_url) as url:
        new.adopt(progress_topic(namespace(url, "outbox")))
        yield url


def drain_rate(db_url: str, kafka: str, new: Topics, topic: str, exactly_once: bool
               ) -> float:
    with eos_database(db_url, new) as url:
        relay = eos_relay_for(url, kafka, topic) if exactly_once else \
            relay_for(url, kafka, CLIENT, topic)
        try:
            fill(url, topic, EVENTS)
            return drain(relay, EVENTS)
        finally:
            close(relay)


def raw_transactions(kafka: str, new: Topics, rate: int, shards: int = DEFAULT_SHARDS
                     ) -> list[float]:
    """Latencies (ms) of Kafka's transactions alone, in the exactly-once relay's round
    shape: each round takes what was made since the last, begins one transaction per
    shard that has events (its events, then a progress record to that shard's partition
    of a compacted topic), and flushes and commits them all at once on a thread each;
    an event's ack is its transaction's commit, as TimedTxn times the relay's. A
    generator thread makes `rate` events/s (common.record, the relay's keys). Each
    producer first commits one transaction to both topics (ids, metadata), as the
    relay is warmed up before it is measured."""
    from confluent_kafka import Producer

    settings = KafkaSettings(kafka, linger_ms=0)
    topic = new("eos-raw")
    progress = new("eos-raw-progress", partitions=shards, config={"cleanup.policy": "compact"})
    tag = uuid.uuid4().hex[:8]
    made: collections.deque[tuple[float, int]] = collections.deque()
    stop = threading.Event()
    start = end = 0.0

    def generate() -> None:
        i = 0
        while not stop.is_set():
            due = start + i / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            made.append((time.monotonic(), i))
            i += 1
            if due >= end:
                return

    def warm(n: int) -> None:
        producers[n].init_transactions(30)
        producers[n].begin_transaction()
        producers[n].produce(topic, b"{}", str(n).encode())
        producers[n].produce(progress, b"warm", str(n).encode(), partition=n)
        producers[n].commit_transaction(30)

    def finish(n: int) -> float:
        producers[n].flush(30)
        producers[n].commit_transaction(30)
        return time.monotonic()

    pool = ThreadPoolExecutor(max_workers=shards)
    generator = threading.Thread(target=generate, name="bench-raw-txn-events")
    latencies: list[float] = []
    try:
        producers = [Producer({**producer_config(settings), "client.id": f"bench-raw-txn-{n}",
                               "transactional.id": f"bench-raw-txn-{tag}-{n}",
                               "transaction.timeout.ms": 60_000,
                               "message.timeout.ms": 60_000})
                     for n in range(shards)]
        list(pool.map(warm, range(shards)))
        start = time.monotonic()
        end = start + WARMUP + SECONDS
        generator.start()
        now = datetime.now(UTC)
        while generator.is_alive() or made:
            batch = [made.popleft() for _ in range(len(made))]
            if not batch:
                time.sleep(0.0005)  # as quick as the relay's NOTIFY wake-up, or quicker
                continue
            by_shard: dict[int, list[float]] = {}
            for made_at, i in batch:
                n = shard_of(key(i), shards)
                if n not in by_shard:
                    producers[n].begin_transaction()
                    by_shard[n] = []
                rec: tuple[bytes, bytes, Any] = record(i, now)  # (confluent's stubs: headers)
                k, v, h = rec
                producers[n].produce(topic, v, k, headers=h)
                by_shard[n].append(made_at)
            for n in by_shard:
                producers[n].produce(progress, b"done", str(n).encode(), partition=n)
            for n, acked in zip(by_shard, pool.map(finish, list(by_shard)), strict=True):
                latencies.extend((acked - t) * 1000 for t in by_shard[n]
                                 if t >= start + WARMUP)
    finally:
        stop.set()
        if generator.is_alive():
            generator.join()
        pool.shutdown()
    return latencies


def run(db_url: str, kafka: str) -> list[Result]:
    with topics(kafka) as new:
        topic = new("eos")
        plain = drain_rate(db_url, kafka, new, topic, exactly_once=False)
        eos = drain_rate(db_url, kafka, new, topic, exactly_once=True)
        latencies = {}
        for flag in (False, True):
            with eos_database(db_url, new) as url:
                got, reached, missing = measure(url, kafka, new("eos-latency"), CLIENT, RATE,
                                                exactly_once=flag)
            if not got or missing:
                raise RuntimeError(f"exactly_once={flag}: {missing} events not acknowledged")
            latencies[flag] = (got, reached)
        raw = raw_transactions(kafka, new, RATE)
    results = [Result(f"drain {EVENTS:,}, --exactly-once, {CLIENT}", eos, "events/s",
                      "the same relay without it", plain, target=(">=", 0.7))]
    for flag, label in ((False, f"{CLIENT} without it"), (True, f"{CLIENT} --exactly-once")):
        got, reached = latencies[flag]
        note = f"reached {reached:,.0f}/s, {len(got):,} events"
        # the latency plot draws the exactly-once CDF (bench_latency draws the other)
        results.append(Result(f"commit-to-ack, {label}, {RATE:,}/s, p50", percentile(got, 50),
                              "ms", note=note, samples=got if flag else None))
        results.append(Result(f"commit-to-ack, {label}, {RATE:,}/s, p99", percentile(got, 99),
                              "ms", note=note, target=("<=", 50.0) if flag else None))
    note = (f"{DEFAULT_SHARDS} transactional producers, no database: the relay's floor "
            f"here; {len(raw):,} events")
    results.append(Result(f"commit-to-ack, raw confluent transactions, {RATE:,}/s, p50",
                          percentile(raw, 50), "ms", note=note))
    results.append(Result(f"commit-to-ack, raw confluent transactions, {RATE:,}/s, p99",
                          percentile(raw, 99), "ms", note=note))
    return results
