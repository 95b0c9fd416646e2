"""`make demo`: the orders service on the real stack, with a relay and a consumer killed
mid-way, then a summary of what the guarantees promised and what happened.

Run with the stack up (`scripts/stack up; eval "$(scripts/stack env)"`):
    python -m examples.demo [--orders 1200] [--rate 100]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import sqlalchemy as sa
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.engine import make_url

from examples.latency_plot import draw_or_say, percentile
from outbox import migrate
from outbox.dburl import libpq_url, sqlalchemy_url

ROOT = Path(__file__).resolve().parents[1]
console = Console()


class Service:
    """A child process (`outbox relay` or `outbox consume`) we can kill and restart."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.args, self.env, self.log = name, args, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "outbox.cli", *self.args],
                                         stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=ROOT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def setup(admin_url: str, kafka: str, run_id: str) -> tuple[str, str]:
    """A fresh `outbox_demo` database (outbox tables + the service's) and a fresh topic."""
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute('DROP DATABASE IF EXISTS "outbox_demo" WITH (FORCE)')
        conn.execute('CREATE DATABASE "outbox_demo"')
    url = make_url(admin_url).set(database="outbox_demo").render_as_string(hide_password=False)
    migrate.upgrade(url)
    from examples.orders.app import Base
    from examples.orders.projector import DDL

    engine = sa.create_engine(url)
    with engine.begin() as c:
        Base.metadata.create_all(c)
        for ddl in DDL:
            c.execute(sa.text(ddl))
    engine.dispose()
    topic = os.environ["DEMO_TOPIC"]
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    admin.close()
    return url, topic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orders", type=int, default=1200)
    parser.add_argument("--rate", type=float, default=100.0, help="orders per second")
    args = parser.parse_args()
    admin_url = sqlalchemy_url(os.environ["OUTBOX_DATABASE_URL"])
    kafka = os.environ["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]
    run_id = uuid.uuid4().hex[:8]
    os.environ["DEMO_TOPIC"] = f"demo.orders.{run_id}"  # read by examples.orders.app at import
    url, topic = setup(admin_url, kafka, run_id)

    from examples.orders import app

    engine = sa.create_engine(url, pool_size=4)
    app.SessionLocal.configure(bind=engine)
    logs = ROOT / "reports" / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OUTBOX_DATABASE_URL": url, "DEMO_TOPIC": topic,
           "DEMO_GROUP": f"order-projector-{run_id}", "PYTHONPATH": str(ROOT),
           "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka}
    relay = Service("relay", ["relay", "--poll-interval", "0.5"], env, logs / "relay.log")
    # A short session timeout lets Kafka move a killed consumer's partitions within seconds.
    # static membership: the restarted consumer takes its partitions back at once,
    # without waiting out the killed one's session
    consumer = Service("consumer", ["consume", "examples.orders.projector:OrderProjector",
                                    "--session-timeout-ms", "6000",
                                    "--group-instance-id", f"order-projector-{run_id}"],
                       env, logs / "consumer.log")

    committed: dict[str, float] = {}  # request id -> commit time (epoch seconds)
    events: dict[str, int] = {}  # request id -> events its order published
    rolled_back: set[str] = set()
    lock = threading.Lock()
    placed = [0]

    def writer(index: int, count: int) -> None:
        rng = random.Random(index)
        interval = 4 / args.rate
        for _ in range(count):
            request = uuid.uuid4()
            amount = Decimal(rng.choice([rng.randint(5, 500), rng.randint(901, 999)]
                                        if rng.random() < 0.1 else [rng.randint(5, 500)]))
            try:
                order_id = app.place_order(request, rng.randint(1, 50), amount)
                with lock:
                    committed[str(request)] = time.time()
                    events[str(request)] = 1
                if rng.random() < 0.5:
                    app.pay_order(order_id)
                    with lock:
                        events[str(request)] = 2
            except app.PaymentDeclined:
                with lock:
                    rolled_back.add(str(request))
            with lock:
                placed[0] += 1
            time.sleep(interval * rng.uniform(0.5, 1.5))

    threads = [threading.Thread(target=writer, args=(i, args.orders // 4)) for i in range(4)]
    total = args.orders // 4 * 4
    faults: list[str] = []
    started = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        t_orders = progress.add_task("orders placed", total=total)
        t_proj = progress.add_task("events projected", total=None)
        for t in threads:
            t.start()
        killed: set[str] = set()
        check = sa.text("SELECT count(*) FROM projection_log")
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
            progress.update(t_orders, completed=placed[0])
            with engine.connect() as c:
                progress.update(t_proj, completed=c.scalar(check))
            for service, at in ((relay, 0.35), (consumer, 0.65)):
                if service.name not in killed and placed[0] > total * at:
                    service.kill()
                    faults.append(f"{service.name} SIGKILLed and restarted")
                    progress.console.print(f"[yellow]kill -9 {service.name}[/] "
                                           "(restarting in 1 s)")
                    time.sleep(1)
                    service.start()
                    killed.add(service.name)
        expected = sum(events.values())
        progress.update(t_proj, total=expected)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with engine.connect() as c:
                done = c.scalar(check) or 0
            progress.update(t_proj, completed=done)
            if done >= expected:
                break
            time.sleep(0.2)
    relay_rc, consumer_rc = relay.stop(), consumer.stop()
    elapsed = time.monotonic() - started
    return report(engine, kafka, topic, committed, events, rolled_back, faults, elapsed,
                  logs, relay_rc, consumer_rc)


def report(engine: sa.Engine, kafka: str, topic: str, committed: dict[str, float],
           events: dict[str, int], rolled_back: set[str], faults: list[str], elapsed: float,
           logs: Path, relay_rc: int, consumer_rc: int) -> int:
    records, ids, seen_requests, sent = read_topic(kafka, topic, sum(events.values()))
    with engine.connect() as c:
        log_rows = c.execute(sa.text(
            "SELECT l.event_id, l.applied, extract(epoch FROM l.projected_at), l.version, "
            "o.request_id FROM projection_log l JOIN orders o ON o.id = l.order_id")).all()
        violations = c.scalar(sa.text("SELECT count(*) FROM order_violations"))
        pending = c.scalar(sa.text("SELECT count(*) FROM outbox_events"))
    engine.dispose()
    applied_twice = sum(1 for r in log_rows if r[1] != 1)
    firsts = [(str(r[4]), float(r[2])) for r in log_rows if r[3] == 1 and str(r[4]) in committed]
    lat = sorted((projected - committed[req]) * 1000 for req, projected in firsts)
    to_kafka = sorted((sent[req] - committed[req]) * 1000 for req, _ in firsts if req in sent)
    to_view = sorted((projected - sent[req]) * 1000 for req, projected in firsts if req in sent)
    absorbed = sum(int(m) for m in re.findall(r"(\d+) duplicates skipped",
                                              (logs / "consumer.log").read_text()))
    expected = sum(events.values())
    phantom = len(seen_requests & rolled_back)

    def pct(p: float, values: list[float] = lat) -> str:
        return f"{percentile(values, p):.0f} ms" if values else "-"

    histogram = draw_or_say(lat, ROOT / "reports" / "demo-latency.png", to_kafka)

    checks = [
        ("orders committed", f"{len(committed)}", True),
        ("events committed (placed + paid)", f"{expected}", True),
        ("events published to Kafka (unique)", f"{len(ids)}", len(ids) == expected),
        ("duplicates delivered by Kafka", f"{records - len(ids)}", True),
        ("duplicates absorbed by the consumer", f"{absorbed}", True),
        ("events projected exactly once", f"{len(log_rows) - applied_twice} of {expected}",
         len(log_rows) == expected and applied_twice == 0),
        ("orders rolled back on purpose", f"{len(rolled_back)}", len(rolled_back) > 0),
        ("rolled-back orders with an event", f"{phantom}", phantom == 0),
        ("per-key order violations", f"{violations}", violations == 0),
        ("outbox left pending", f"{pending}", pending == 0),
        ("faults injected", "; ".join(faults) or "none", len(faults) == 2),
        ("relay / consumer exit codes on SIGTERM", f"{relay_rc} / {consumer_rc}",
         relay_rc == 0 and consumer_rc == 0),
        ("commit-to-projection latency p50 / p99", f"{pct(0.5)} / {pct(0.99)}", True),
        ("  of which commit to Kafka (relay)", f"{pct(0.5, to_kafka)} / {pct(0.99, to_kafka)}",
         True),
        ("  of which Kafka to read model (consumer)",
         f"{pct(0.5, to_view)} / {pct(0.99, to_view)}", True),
        ("  its histogram", histogram, True),
        ("run time", f"{elapsed:.0f} s", True),
    ]
    table = Table(title="transactional-outbox demo")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_column("ok")
    for name, value, ok in checks:
        table.add_row(name, value, "[green]yes[/]" if ok else "[red]NO[/]")
    console.print(table)
    (logs / "summary.json").write_text(json.dumps(
        {name: {"value": value, "ok": ok} for name, value, ok in checks}, indent=2))
    failed = [name for name, _, ok in checks if not ok]
    if failed:
        console.print(f"[red]invariants failed:[/] {', '.join(failed)} (logs in {logs})")
        return 1
    console.print(f"[green]all invariants hold.[/] Logs and summary.json in {logs}")
    return 0


def read_topic(kafka: str, topic: str, expect: int
               ) -> tuple[int, set[str], set[str], dict[str, float]]:
    """Records, unique event ids, request ids seen, and when each order's first event was
    sent to Kafka (the record's timestamp, epoch seconds)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=f"demo-check-{uuid.uuid4().hex}")
    records = 0
    ids: set[str] = set()
    requests: set[str] = set()
    sent: dict[str, float] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(ids) < expect:
        for recs in consumer.poll(timeout_ms=500).values():
            for r in recs:
                records += 1
                ids.add(dict(r.headers)["ce_id"].decode())
                payload = json.loads(r.value)
                requests.add(payload["request_id"])
                if payload["version"] == 1:
                    sent.setdefault(payload["request_id"], r.timestamp / 1000)
    for recs in consumer.poll(timeout_ms=1000).values():  # late duplicates
        for r in recs:
            records += 1
            ids.add(dict(r.headers)["ce_id"].decode())
    consumer.close()
    return records, ids, requests, sent


if __name__ == "__main__":
    sys.exit(main())
