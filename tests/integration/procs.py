"""Helpers for tests that run the real system as processes and break it on purpose."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import sqlalchemy as sa
from kafka import KafkaConsumer
from sqlalchemy.orm import Session, sessionmaker

from outbox import Outbox
from outbox.dburl import libpq_url
from outbox.schema import tables

ROOT = Path(__file__).resolve().parents[2]


def stack(*args: str) -> None:
    """Run a `scripts/stack` fault command (kafka-stop, pg-restart -m immediate, ...)."""
    subprocess.run([str(ROOT / "scripts" / "stack"), *args], check=True, timeout=180,
                   stdout=subprocess.DEVNULL)


class RelayProcess:
    """`outbox relay` as a child process, its output in a log file."""

    def __init__(self, db_url: str, kafka: str, log_dir: Path, name: str,
                 extra_env: dict[str, str] | None = None) -> None:
        self.db_url, self.kafka, self.name = db_url, kafka, name
        self.log = log_dir / f"{name}.log"
        self.env = {**os.environ, **(extra_env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "outbox.cli", "--log-level",
                 self.env.get("OUTBOX_LOG_LEVEL", "INFO"), "relay", "--db", self.db_url,
                 "--kafka", self.kafka, "--poll-interval", "0.5", "--lease", "5",
                 "--relay-id", self.name],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Writes:
    """What writers know: committed event ids, ambiguous ones (commit outcome unknown)."""

    committed: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (key, seq)
    ambiguous: dict[str, tuple[str, int]] = field(default_factory=dict)
    failures: int = 0


class Writer:
    """Threads writing events with a per-key sequence number, at a steady pace.

    Each key belongs to one thread, so a key's commit order is its sequence order.
    A commit that fails because the database went away is ambiguous (it may have
    committed): it is retried with the same sequence number and recorded as such.
    """

    def __init__(self, db_url: str, topic: str, *, total: int, keys: int, threads: int = 4,
                 rate: float = 500.0) -> None:
        self.engine = sa.create_engine(db_url, pool_size=threads, pool_pre_ping=True)
        self.box = Outbox()
        self.factory = sessionmaker(self.engine)
        self.topic, self.total, self.keys = topic, total, keys
        self.threads, self.rate = threads, rate
        self.writes = Writes()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, args=(i,), daemon=True)
                         for i in range(threads)]
        self.done = threading.Event()

    def start(self) -> Writer:
        for w in self._workers:
            w.start()
        return self

    def join(self, timeout: float = 300) -> None:
        for w in self._workers:
            w.join(timeout)
        self.engine.dispose()

    def _work(self, index: int) -> None:
        keys = [f"key-{k}" for k in range(self.keys) if k % self.threads == index]
        seq = dict.fromkeys(keys, 0)
        per_thread = self.total // self.threads
        interval = self.threads / self.rate
        box = self.box

        @box.transactional(self.factory)
        def write(session: Session, key: str, n: int, holder: list[str]) -> None:
            holder.append(str(box.publish(session, topic=self.topic, key=key, type="Seq",
                                          payload={"key": key, "seq": n}).id))

        rng = random.Random(index)
        for i in range(per_thread):
            key = keys[rng.randrange(len(keys))]
            seq[key] += 1
            while True:
                holder: list[str] = []
                try:
                    write(key, seq[key], holder)
                    with self._lock:
                        self.writes.committed[holder[0]] = (key, seq[key])
                    break
                except sa.exc.DBAPIError:
                    with self._lock:
                        self.writes.failures += 1
                        if holder:  # the commit itself may have gone through
                            self.writes.ambiguous[holder[0]] = (key, seq[key])
                    time.sleep(0.2)
            if i % 10 == 9:
                time.sleep(interval * 10)
        self.done.set()


def pending_count(db_url: str) -> int:
    with psycopg.connect(libpq_url(db_url), connect_timeout=5) as conn:
        row = conn.execute(f"SELECT count(*) FROM {tables.events.name}").fetchone()
        return int(row[0]) if row else 0


def wait_drained(db_url: str, timeout: float) -> float:
    """Wait until the outbox is empty; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if pending_count(db_url) == 0:
                return time.monotonic() - started
        except psycopg.Error:
            pass
        time.sleep(0.25)
    raise AssertionError(f"outbox not drained after {timeout}s "
                         f"({pending_count(db_url)} events pending)")


@dataclass
class Delivered:
    """Every record of a topic: first occurrence order per key, and duplicate count."""

    first_seqs: dict[str, list[int]]
    ids: set[str]
    records: int

    @property
    def duplicates(self) -> int:
        return self.records - len(self.ids)


def read_all(bootstrap: str, topic: str, expect_ids: set[str], timeout: float = 90) -> Delivered:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=f"check-{uuid.uuid4().hex[:8]}")
    first: dict[str, list[int]] = defaultdict(list)
    ids: set[str] = set()
    records = 0
    deadline = time.monotonic() + timeout
    quiet_until = None
    while time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=1000)
        for recs in batch.values():
            for r in recs:
                records += 1
                eid = dict(r.headers)["ce_id"].decode()
                if eid not in ids:
                    ids.add(eid)
                    first[r.key.decode()].append(json.loads(r.value)["seq"])
        if expect_ids <= ids:
            # everything expected is here; read a little longer for late duplicates
            quiet_until = quiet_until or time.monotonic() + 2
            if time.monotonic() > quiet_until:
                break
    consumer.close()
    return Delivered(dict(first), ids, records)


def order_violations(first_seqs: dict[str, list[int]]) -> list[str]:
    """Keys whose first deliveries are not in commit (sequence) order."""
    bad = []
    for key, seqs in first_seqs.items():
        if any(b < a for a, b in itertools.pairwise(seqs)):
            bad.append(key)
    return bad
