"""What `--exactly-once` costs, beside the same relay without it, in one run (confluent
client, the fast lane; the same records as bench_relay):

- the drain rate of a 100,000-event backlog, as a ratio to the default relay's;
- commit-to-ack latency at 1,000 events/s (bench_latency's writers and clock; the ack
  of an exactly-once event is its transaction's commit).
"""

from __future__ import annotations

from benchmarks.bench_latency import measure, percentile
from benchmarks.common import Result, close, database, drain, fill, relay_for, sized, topics
from outbox.exactly_once import namespace
from outbox.progress import KafkaProgressLog, progress_topic
from outbox.publisher import KafkaSettings, make_publisher
from outbox.relay import Relay, RelayConfig
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


def drain_rate(db_url: str, kafka: str, topic: str, exactly_once: bool) -> float:
    with database(db_url) as url:
        relay = eos_relay_for(url, kafka, topic) if exactly_once else \
            relay_for(url, kafka, CLIENT, topic)
        try:
            fill(url, topic, EVENTS)
            return drain(relay, EVENTS)
        finally:
            close(relay)


def run(db_url: str, kafka: str) -> list[Result]:
    with topics(kafka) as new:
        topic = new("eos")
        plain = drain_rate(db_url, kafka, topic, exactly_once=False)
        eos = drain_rate(db_url, kafka, topic, exactly_once=True)
        latencies = {}
        for flag in (False, True):
            with database(db_url) as url:
                got, reached, missing = measure(url, kafka, new("eos-latency"), CLIENT, RATE,
                                                exactly_once=flag)
            if not got or missing:
                raise RuntimeError(f"exactly_once={flag}: {missing} events not acknowledged")
            latencies[flag] = (got, reached)
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
    return results
