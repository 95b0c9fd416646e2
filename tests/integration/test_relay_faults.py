"""Guarantees 2 and 3 with relay processes under faults: SIGKILL, broker down, database restart.

Each test writes events at a steady pace with per-key sequence numbers while three
`outbox relay` processes publish them, injects its fault mid-stream, then checks:
every committed event reached Kafka (by ce_id), nothing else did, each key's first
deliveries are in commit order, the outbox is empty, and no relay exited.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.procs import (
    RelayProcess,
    Writer,
    order_violations,
    read_all,
    stack,
    wait_drained,
)


@pytest.fixture
def relays(db_url: str, kafka_bootstrap: str, tmp_path: Path) -> Iterator[list[RelayProcess]]:
    procs = [RelayProcess(db_url, kafka_bootstrap, tmp_path, f"relay-{i}") for i in range(3)]
    yield procs
    for p in procs:
        if p.alive():
            p.terminate()


def check(writer: Writer, kafka: str, topic: str, db_url: str,
          relays: list[RelayProcess]) -> None:
    wait_drained(db_url, timeout=180)
    writes = writer.writes
    committed = set(writes.committed)
    got = read_all(kafka, topic, committed)
    lost = committed - got.ids
    phantom = got.ids - committed - set(writes.ambiguous)
    assert not lost, f"{len(lost)} committed events never reached Kafka"
    assert not phantom, f"{len(phantom)} events in Kafka that no writer committed"
    assert order_violations(got.first_seqs) == []
    for r in relays:
        assert r.alive(), f"{r.name} exited:\n{r.output()[-3000:]}"
    for r in relays:
        assert r.terminate() == 0, f"{r.name} did not exit 0 on SIGTERM"


def test_relay_sigkilled_and_restarted_twice_loses_nothing(
    db_url: str, kafka_bootstrap: str, new_topic: Callable[..., str],
    relays: list[RelayProcess],
) -> None:
    topic = new_topic()
    writer = Writer(db_url, topic, total=10_000, keys=100, rate=700).start()
    rng = random.Random(11)
    for _ in range(2):
        time.sleep(rng.uniform(2, 5))
        relays[0].kill()
        time.sleep(rng.uniform(0.2, 1.5))
        relays[0].start()
    writer.join()
    assert len(writer.writes.committed) == 10_000
    check(writer, kafka_bootstrap, topic, db_url, relays)


def test_broker_down_for_20_seconds(
    db_url: str, kafka_bootstrap: str, new_topic: Callable[..., str],
    relays: list[RelayProcess],
) -> None:
    topic = new_topic()
    writer = Writer(db_url, topic, total=6_000, keys=100, rate=200).start()
    time.sleep(4)
    stack("kafka-stop")
    try:
        time.sleep(20)
    finally:
        stack("kafka-start")
    writer.join()
    check(writer, kafka_bootstrap, topic, db_url, relays)


def test_database_restarted_immediately(
    db_url: str, kafka_bootstrap: str, new_topic: Callable[..., str],
    relays: list[RelayProcess],
) -> None:
    topic = new_topic()
    writer = Writer(db_url, topic, total=6_000, keys=100, rate=300).start()
    time.sleep(4)
    stack("pg-restart", "-m", "immediate")
    writer.join()
    assert writer.writes.failures > 0, "the restart should have interrupted some writes"
    check(writer, kafka_bootstrap, topic, db_url, relays)
