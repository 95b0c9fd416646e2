"""The stall of a consumer restart, with and without static group membership.

Two `outbox consume` processes share a group on a 6-partition topic (session timeout
10 s). One is killed (SIGKILL) and started again at once; one event is then written to
each partition. The stall is the time from the kill until all six are applied: the
restarted process's start-up, plus, without `--group-instance-id`, the rebalance that
waits for the dead member's session to expire. With it, the restarted member takes its
partitions back under its old identity and the other never stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from kafka import KafkaProducer
from sqlalchemy.orm import Session

from benchmarks.common import PARTITIONS, Result, database, record, topics
from outbox import Event, IdempotentConsumer

SESSION_TIMEOUT_MS = 10_000
APPLIED_DDL = "CREATE TABLE IF NOT EXISTS applied (event_id uuid PRIMARY KEY, at float8)"


class Marker(IdempotentConsumer):
    """Records when each event was applied (the subprocesses run it)."""

    topics = [t for t in os.environ.get("BENCH_RESTART_TOPIC", "unset").split(",") if t]
    group_id = "bench-restart"

    def handle(self, event: Event, session: Session) -> None:
        session.execute(sa.text("INSERT INTO applied VALUES (:id, :at)"),
                        {"id": event.id, "at": time.time()})


def _start(url: str, kafka: str, topic: str, group: str, name: str, static: bool,
           logs: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "outbox.cli", "consume", "benchmarks.bench_restart:Marker",
            "--db", url, "--kafka", kafka, "--group-id", group,
            "--session-timeout-ms", str(SESSION_TIMEOUT_MS)]
    if static:
        args += ["--group-instance-id", name]
    log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "BENCH_RESTART_TOPIC": topic})


def _one_per_partition(producer: KafkaProducer, topic: str) -> set[uuid.UUID]:
    ids: set[uuid.UUID] = set()
    now = datetime.now(UTC)
    for p in range(PARTITIONS):
        key, value, headers = record(p, now)
        ids.add(uuid.UUID(bytes(dict(headers)["ce_id"]).decode()))
        producer.send(topic, value=value, key=key, headers=headers, partition=p)
    producer.flush()
    return ids


def _wait_applied(engine: sa.Engine, ids: set[uuid.UUID], timeout: float) -> float:
    """When the last of `ids` was applied (epoch seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as c:
            rows = c.execute(sa.text("SELECT at FROM applied WHERE event_id = ANY(:ids)"),
                             {"ids": list(ids)}).all()
        if len(rows) == len(ids):
            return float(max(r[0] for r in rows))
        time.sleep(0.05)
    raise RuntimeError(f"{len(ids) - len(rows)} of {len(ids)} events not applied in "
                       f"{timeout:.0f}s")


@contextlib.contextmanager
def _group(url: str, kafka: str, topic: str, static: bool,
           logs: Path) -> Iterator[tuple[dict[str, subprocess.Popen[bytes]], str]]:
    group = f"bench-restart-{uuid.uuid4().hex[:6]}"
    procs = {n: _start(url, kafka, topic, group, n, static, logs) for n in ("a", "b")}
    try:
        yield procs, group
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def stall(admin_url: str, kafka: str, static: bool) -> float:
    with topics(kafka) as new, database(admin_url) as url, \
            tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        engine = sa.create_engine(url)
        with engine.begin() as c:
            c.execute(sa.text(APPLIED_DDL))
        topic = new("restart")
        producer = KafkaProducer(bootstrap_servers=kafka, acks="all")
        try:
            with _group(url, kafka, topic, static, Path(tmp)) as (procs, group):
                # both members up and assigned: an event on every partition is applied
                _wait_applied(engine, _one_per_partition(producer, topic), 90)
                time.sleep(2)  # past any rebalance of the start
                killed = time.time()
                procs["a"].kill()
                procs["a"].wait()
                procs["a"] = _start(url, kafka, topic, group, "a", static, Path(tmp))
                applied = _wait_applied(engine, _one_per_partition(producer, topic), 90)
                return applied - killed
        finally:
            producer.close()
            engine.dispose()


def run(db_url: str, kafka: str) -> list[Result]:
    static = stall(db_url, kafka, static=True)
    dynamic = stall(db_url, kafka, static=False)
    return [Result("consumer restart stall, --group-instance-id", static, "s",
                   "the same without it", dynamic,
                   note=f"SIGKILL + restart at once; session timeout "
                        f"{SESSION_TIMEOUT_MS // 1000} s")]
