"""The chaos run: the real system as processes under a seeded, random fault schedule, then a
checker over what happened.

    python -m tests.chaos.run --seed 1 --duration 600 [--unsafe ack|ordering|dedupe|shards]

Writers (the decorator), 3 relays and 2 consumers run against the real PostgreSQL and
Kafka; relays reach both, and consumers reach Kafka, through TCP proxies this harness
owns. Faults, each kind on its own seeded schedule: SIGKILL of relays and consumers,
SIGSTOP of a relay for longer than its lease, kill -9 of the broker, PostgreSQL
restarted with -m immediate, and connections cut, blackholed or slowed at the proxies.
Then everything heals, the outbox drains, and the checker compares Kafka and the
consumer's effects with what the database says committed. Exit 1 on any violation.
"""

from __future__ import annotations

import argparse
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
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic
from sqlalchemy.engine import make_url

from outbox import migrate
from outbox.dburl import libpq_url, sqlalchemy_url
from tests.chaos.app import DDL
from tests.chaos.proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
STACK = str(ROOT / "scripts" / "stack")
KAFKA_PROXIED_PORT = 9094  # the broker's PROXIED listener (scripts/kafka/server.properties)
KAFKA_PROXY_PORT = 9095  # advertised for that listener: where this harness listens
PG_PROXY_PORT = 25432
LEASE = 3
KINDS = ("relay_kill", "consumer_kill", "relay_pause", "kafka_kill", "pg_restart",
         "net_cut", "net_blackhole", "net_latency")


class Proc:
    """A child process we can kill, pause and restart; its output goes to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=ROOT)

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill_and_restart(self, down: float) -> None:
        with self.lock:
            self.signal(signal.SIGKILL)
            assert self.proc is not None
            self.proc.wait(10)
            time.sleep(down)
            self.start()

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.signal(signal.SIGSTOP)
            time.sleep(seconds)
            self.signal(signal.SIGCONT)

    def ensure_running(self) -> None:
        with self.lock:
            self.signal(signal.SIGCONT)
            if self.proc is None or self.proc.poll() is not None:
                self.start()

    def terminate(self, timeout: float = 40) -> int | None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None


@dataclass
class Report:
    seed: int
    duration: float
    unsafe: str | None
    faults: Counter[str] = field(default_factory=Counter)
    events_committed: int = 0
    rolled_back_or_failed_writes: int = 0
    records_in_kafka: int = 0
    lost: int = 0
    phantom: int = 0
    order_violations: int = 0
    double_applied: int = 0
    not_applied: int = 0
    duplicates_absorbed: int = 0
    drain_seconds: float | None = None
    outbox_left: int = 0
    exits: dict[str, int | None] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def violations(self) -> dict[str, int]:
        return {k: v for k, v in {
            "lost": self.lost, "phantom": self.phantom, "order_violations": self.order_violations,
            "double_applied": self.double_applied, "not_applied": self.not_applied,
            "outbox_left": self.outbox_left}.items() if v}

    def as_dict(self) -> dict[str, object]:
        return {
            "seed": self.seed, "duration": self.duration, "unsafe": self.unsafe,
            "faults": dict(self.faults), "events_committed": self.events_committed,
            "records_in_kafka": self.records_in_kafka, "lost": self.lost,
            "phantom": self.phantom, "order_violations": self.order_violations,
            "double_applied": self.double_applied, "not_applied": self.not_applied,
            "duplicates_absorbed": self.duplicates_absorbed,
            "drain_seconds": self.drain_seconds, "outbox_left": self.outbox_left,
            "exit_codes": self.exits, "violations": self.violations,
            "examples": self.examples,
        }


def stack(*args: str) -> None:
    subprocess.run([STACK, *args], check=True, timeout=180, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def run(seed: int, duration: float, *, unsafe: str | None = None, relays: int = 3,
        consumers: int = 2, writers: int = 2, rate: float = 60.0,
        log: Callable[[str], None] = print) -> Report:
    admin_url = sqlalchemy_url(os.environ["OUTBOX_DATABASE_URL"])
    kafka = os.environ["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]
    run_id = f"{seed}-{uuid.uuid4().hex[:6]}"
    logs = ROOT / "reports" / f"chaos-{run_id}"
    logs.mkdir(parents=True, exist_ok=True)
    report = Report(seed=seed, duration=duration, unsafe=unsafe)

    db = "outbox_chaos"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db}"')
    url = make_url(admin_url).set(database=db)
    direct_url = url.render_as_string(hide_password=False)
    proxied_url = url.set(host="127.0.0.1", port=PG_PROXY_PORT).render_as_string(
        hide_password=False)
    migrate.upgrade(direct_url)
    with psycopg.connect(libpq_url(direct_url), autocommit=True) as conn:
        for ddl in DDL:
            conn.execute(ddl)
    topic = f"chaos-{run_id}"
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])
    admin.close()

    pg_port = make_url(admin_url).port or 5432
    kafka_proxy = TcpProxy(KAFKA_PROXY_PORT, KAFKA_PROXIED_PORT, "kafka")
    pg_proxy = TcpProxy(PG_PROXY_PORT, pg_port, "postgres")
    proxies = [kafka_proxy, pg_proxy]
    base_env = {**os.environ, "PYTHONPATH": str(ROOT), "CHAOS_TOPIC": topic,
                "CHAOS_GROUP": f"chaos-{run_id}", "OUTBOX_LOG_LEVEL": "INFO"}
    base_env.pop("OUTBOX_UNSAFE_DISABLE", None)

    def env_for(part: str) -> dict[str, str]:
        wanted = {"ordering": "writer", "ack": "relay", "shards": "relay", "dedupe": "consumer"}
        if unsafe and wanted[unsafe] == part:
            return {**base_env, "OUTBOX_UNSAFE_DISABLE": unsafe}
        return base_env

    py = sys.executable
    writer_procs = [Proc(f"writer-{i}", [py, "-m", "tests.chaos.app", "writer", "--db",
                                          direct_url, "--topic", topic, "--rate",
                                          str(rate / writers), "--seed", str(seed * 10 + i)],
                         env_for("writer"), logs) for i in range(writers)]
    relay_procs = [Proc(f"relay-{i}", [py, "-m", "outbox.cli", "relay", "--db", proxied_url,
                                        "--kafka", f"127.0.0.1:{KAFKA_PROXY_PORT}",
                                        "--lease", str(LEASE), "--poll-interval", "0.5",
                                        # sends fail during a broker outage: retry paths run
                                        "--delivery-timeout-ms", "4000",
                                        "--relay-id", f"relay-{i}"],
                        env_for("relay"), logs) for i in range(relays)]
    consumer_procs = [Proc(f"consumer-{i}", [py, "-m", "outbox.cli", "consume",
                                              "tests.chaos.app:Effects", "--db", direct_url,
                                              "--kafka", f"127.0.0.1:{KAFKA_PROXY_PORT}",
                                              "--session-timeout-ms", "6000"],
                           env_for("consumer"), logs) for i in range(consumers)]

    stop = threading.Event()
    lock = threading.Lock()
    # Each kind gets about 70 slots per 10 minutes and fires at a random moment in each;
    # a kind whose faults take longer than a slot fires again at once, to catch up.
    slots = max(1, round(duration / 600 * 70))
    slot = duration / slots
    clock = {"started": time.monotonic()}

    def faults(kind: str) -> None:
        rng = random.Random(f"{seed}-{kind}")
        for i in range(slots):
            at = clock["started"] + i * slot + rng.uniform(0, slot * 0.8)
            if stop.wait(max(0.0, at - time.monotonic())):
                return
            try:
                inject(kind, rng)
                with lock:
                    report.faults[kind] += 1
            except Exception as exc:  # a fault that could not be injected is reported
                log(f"fault {kind} failed: {exc}")

    def inject(kind: str, rng: random.Random) -> None:
        if kind == "relay_kill":
            rng.choice(relay_procs).kill_and_restart(rng.uniform(0.1, 1.5))
        elif kind == "consumer_kill":
            rng.choice(consumer_procs).kill_and_restart(rng.uniform(0.1, 1.5))
        elif kind == "relay_pause":
            rng.choice(relay_procs).pause(LEASE + rng.uniform(1, 3))
        elif kind == "kafka_kill":
            stack("kafka-kill")
            time.sleep(rng.uniform(0, 1))
            stack("kafka-start")
        elif kind == "pg_restart":
            stack("pg-restart", "-m", "immediate")
        elif kind == "net_cut":
            rng.choice(proxies).cut(refuse_for=rng.uniform(0, 2))
        elif kind == "net_blackhole":
            proxy = rng.choice(proxies)
            seconds = rng.uniform(2, 6)
            proxy.blackhole(seconds)
            time.sleep(seconds)
        elif kind == "net_latency":
            proxy = rng.choice(proxies)
            proxy.slow(rng.uniform(0.02, 0.2))
            time.sleep(rng.uniform(2, 6))
            proxy.slow(0.0)

    threads = [threading.Thread(target=faults, args=(k,), daemon=True) for k in KINDS]
    started = clock["started"] = time.monotonic()
    log(f"chaos seed={seed} duration={duration:.0f}s unsafe={unsafe or '-'} logs={logs}")
    for t in threads:
        t.start()
    while time.monotonic() - started < duration:
        time.sleep(min(10.0, duration - (time.monotonic() - started)))
        with lock:
            log(f"  {time.monotonic() - started:5.0f}s faults so far: {dict(report.faults)}")
    stop.set()
    for t in threads:
        t.join(60)

    # Heal everything, stop writing, let the system drain.
    for proxy in proxies:
        proxy.heal()
    stack("up")
    for p in relay_procs + consumer_procs:
        p.ensure_running()
    for w in writer_procs:
        report.exits[w.name] = w.terminate()
    drain_started = time.monotonic()
    committed = load_committed(direct_url)
    report.events_committed = len(committed)
    deadline = drain_started + 300
    while time.monotonic() < deadline:
        left, applied = progress(direct_url)
        if left == 0 and applied >= len(committed):
            report.drain_seconds = round(time.monotonic() - drain_started, 1)
            break
        time.sleep(1)
    for p in relay_procs + consumer_procs:
        report.exits[p.name] = p.terminate()
    for proxy in proxies:
        proxy.close()
    check(report, direct_url, kafka, topic, committed, logs)
    (logs / "summary.json").write_text(json.dumps(report.as_dict(), indent=2))
    return report


def load_committed(url: str) -> dict[str, tuple[str, int]]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute("SELECT event_id::text, key, version FROM chaos_events").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def progress(url: str) -> tuple[int, int]:
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=5) as conn:
            left = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
            applied = conn.execute("SELECT count(*) FROM chaos_effects").fetchone()
        return int(left[0]) if left else -1, int(applied[0]) if applied else 0
    except psycopg.Error:
        return -1, 0


def check(report: Report, url: str, kafka: str, topic: str,
          committed: dict[str, tuple[str, int]], logs: Path) -> None:
    """Compare Kafka and the effects with what the database says committed."""
    first: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    records = 0
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=f"check-{uuid.uuid4().hex}")
    quiet = 0
    while quiet < 3:
        batch = consumer.poll(timeout_ms=1000)
        quiet = 0 if batch else quiet + 1
        for recs in batch.values():
            for r in recs:
                records += 1
                eid = dict(r.headers)["ce_id"].decode()
                if eid in seen:
                    continue
                seen.add(eid)
                if eid in committed:
                    key, version = committed[eid]
                    first[key].append(version)
    consumer.close()
    report.records_in_kafka = records
    lost = set(committed) - seen
    phantom = seen - set(committed)
    report.lost, report.phantom = len(lost), len(phantom)
    bad_keys = [k for k, vs in first.items()
                if any(b <= a for a, b in itertools.pairwise(vs))]
    report.order_violations = sum(
        sum(1 for a, b in zip(first[k], first[k][1:], strict=False) if b <= a) for k in bad_keys)
    with psycopg.connect(libpq_url(url)) as conn:
        effects = {str(r[0]): r[1] for r in conn.execute("SELECT event_id, n FROM chaos_effects")}
        left = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
    report.outbox_left = int(left[0]) if left else 0
    report.double_applied = sum(1 for n in effects.values() if n > 1)
    report.not_applied = len(set(committed) - set(effects))
    report.phantom += len(set(effects) - set(committed))
    report.duplicates_absorbed = records - len(seen)
    report.examples = {
        "lost": sorted(lost)[:5], "phantom": sorted(phantom)[:5],
        "order_violation_keys": [f"{k}: {first[k][:20]}" for k in bad_keys[:3]],
        "double_applied": [e for e, n in effects.items() if n > 1][:5],
    }


def print_summary(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"chaos run: seed {report.seed}, {report.duration:.0f} s"
                        + (f", UNSAFE without {report.unsafe}" if report.unsafe else ""))
    table.add_column("what")
    table.add_column("value", justify="right")
    for kind in KINDS:
        table.add_row(f"faults: {kind}", str(report.faults[kind]))
    rows = [
        ("events written (committed)", report.events_committed),
        ("records in Kafka", report.records_in_kafka),
        ("lost", report.lost), ("phantom", report.phantom),
        ("order violations", report.order_violations),
        ("double-applied", report.double_applied), ("not applied", report.not_applied),
        ("duplicates delivered and absorbed", report.duplicates_absorbed),
        ("outbox left", report.outbox_left),
        ("drain time", f"{report.drain_seconds} s" if report.drain_seconds is not None
         else "did not drain"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    Console().print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=120)
    parser.add_argument("--unsafe", choices=["ack", "ordering", "dedupe", "shards"])
    parser.add_argument("--min-faults", type=int, default=0,
                        help="fail unless every kind of fault was injected this often")
    args = parser.parse_args()
    report = run(args.seed, args.duration, unsafe=args.unsafe)
    print_summary(report)
    out = ROOT / "reports" / f"chaos-seed{args.seed}.json"
    out.write_text(json.dumps(report.as_dict(), indent=2))
    print(f"written: {out}")
    short = [k for k in KINDS if report.faults[k] < args.min_faults]
    if report.violations:
        print(f"VIOLATIONS: {report.violations}  examples: {report.examples}")
    if short:
        print(f"too few faults of kinds {short} (wanted {args.min_faults} each)")
    return 1 if report.violations or short else 0


if __name__ == "__main__":
    sys.exit(main())
