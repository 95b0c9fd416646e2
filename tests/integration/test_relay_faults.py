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

from outbox.publisher import CLIENTS
from tests.integration.procs import (
    RelayProcess,
    Writer,
    Writes,
    order_violations,
    pending_count,
    read_all,
    stack,
    wait_drained,
)


@pytest.fixture(params=CLIENTS)
def relays(db_url: str, kafka_bootstrap: str, tmp_path: Path,
           request: pytest.FixtureRequest) -> Iterator[list[RelayProcess]]:
    """Three `outbox relay` processes, with each Kafka client in turn (one contract)."""
    env = {"OUTBOX_KAFKA_CLIENT": request.param}
    procs = [RelayProcess(db_url, kafka_bootstrap, tmp_path, f"relay-{i}", extra_env=env)
             for i in range(3)]
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


@pytest.mark.parametrize("unsafe", [False, True], ids=["ack-before-delete", "UNSAFE-no-ack"])
def test_relay_killed_while_kafka_is_unreachable(
    db_url: str, kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path,
    unsafe: bool,
) -> None:
    """The relay deletes only what Kafka acknowledged: killed while its sends hang in a
    blackholed connection, it loses nothing. Without that mechanism the same run loses
    events, which shows this check can fail."""
    from tests.chaos.proxy import TcpProxy
    from tests.chaos.run import KAFKA_PROXIED_PORT, KAFKA_PROXY_PORT

    topic = new_topic()
    proxy = TcpProxy(KAFKA_PROXY_PORT, KAFKA_PROXIED_PORT, "kafka")
    env = {"OUTBOX_LOG_LEVEL": "DEBUG"}
    if unsafe:
        env["OUTBOX_UNSAFE_DISABLE"] = "ack"
    relay = RelayProcess(db_url, f"127.0.0.1:{KAFKA_PROXY_PORT}", tmp_path, "relay",
                         extra_env=env)
    try:
        writer = Writer(db_url, topic, total=200, keys=10, rate=400).start()
        writer.join()
        time.sleep(3)  # the relay has published these
        proxy.blackhole(60)
        writer = Writer(db_url, topic, total=200, keys=10, rate=400)
        writer.writes = Writes()
        writer.start().join()
        time.sleep(3)  # claimed and sent into the void
        relay.kill()
    finally:
        proxy.close()
    relay = RelayProcess(db_url, kafka_bootstrap, tmp_path, "relay-after")
    try:
        committed = set(writer.writes.committed)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and pending_count(db_url):
            time.sleep(0.5)
        got = read_all(kafka_bootstrap, topic, committed, timeout=20)
    finally:
        relay.terminate()
    lost = committed - got.ids
    if unsafe:
        assert lost, ("deleting before the ack should have lost the events in flight: "
                      f"{len(committed)} committed, {len(got.ids)} in Kafka")
    else:
        assert not lost
