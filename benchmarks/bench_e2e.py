"""End to end, commit to effect applied, at a steady 1,000 events/s (issue 11's target:
p50 <= 20 ms, p99 <= 100 ms), for each client.

The deployment's shape: `outbox relay` and `outbox consume` run as their own processes
(as `make demo` runs them), the writers in this one (bench_latency's PacedWriter: one
event per transaction through `@box.transactional`). The clock starts when the writer's
commit returns (wall clock) and stops at the consumer handler's INSERT
(`clock_timestamp()` of the same machine, when the row is inserted). The handler writes
its row one of two ways: one `session.execute` per event, stamped as it runs, before
the batch's commit; or the ORM's `session.add`, inserted at the commit. The record's
timestamp (CreateTime, the relay's send) splits the figure into the relay's share and
the consumer's. Both services start before the writers, and one event applied before
the clock runs shows the consumer has joined its group. The first WARMUP seconds are not counted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from benchmarks.bench_latency import PER_TX, WRITERS, PacedWriter, percentile
from benchmarks.common import Result, database, topics
from benchmarks.e2e_app import DDL
from outbox import Outbox

RATE = 1_000
CLIENTS = ("kafka-python", "confluent")
ROOT = Path(__file__).resolve().parents[1]


def _service(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "outbox.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _applied(engine: sa.Engine) -> dict[str, float]:
    with engine.connect() as c:
        rows = c.execute(sa.text(
            "SELECT event_id, extract(epoch FROM applied_at) FROM bench_applied"))
        return {str(r[0]): float(r[1]) for r in rows}


def _wait(engine: sa.Engine, want: int, seconds: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + seconds
    count = sa.text("SELECT count(*) FROM bench_applied")
    while True:
        with engine.connect() as c:
            if (c.scalar(count) or 0) >= want:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"end to end: {what} (logs in {log.parent})")
        time.sleep(0.2)


def _sent(kafka: str, topic: str, n: int) -> dict[str, float]:
    """Each event's record timestamp (CreateTime: when the relay produced it), by id."""
    from confluent_kafka import Consumer

    reader = Consumer({"bootstrap.servers": kafka, "group.id": f"e2e-read-{uuid.uuid4().hex}",
                       "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    reader.subscribe([topic])
    out: dict[str, float] = {}
    deadline = time.monotonic() + 60
    try:
        while len(out) < n and time.monotonic() < deadline:
            for m in reader.consume(1000, 0.5):
                if m.error() is None:
                    raw = dict(m.headers() or ()).get("ce_id")
                    eid = raw.decode() if isinstance(raw, bytes) else str(raw)
                    out.setdefault(eid, m.timestamp()[1] / 1000)
    finally:
        reader.close()
    return out


Split = tuple[list[float], list[float], list[float]]


def measure(url: str, kafka: str, topic: str, client: str, handler: str = "Applied"
            ) -> tuple[Split, float, int]:
    """((commit to effect, commit to send, send to effect) in ms of the counted events,
    the rate reached, events not applied)."""
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text(DDL))
    logs = ROOT / "reports" / "bench-e2e"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OUTBOX_DATABASE_URL": url, "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka,
           "OUTBOX_KAFKA_CLIENT": client, "PYTHONPATH": str(ROOT),
           "BENCH_E2E_TOPIC": topic, "BENCH_E2E_GROUP": f"bench-e2e-{uuid.uuid4().hex[:6]}"}
    log = logs / f"{client}-{handler}.log"
    log.write_text("")
    relay = _service(["relay", "--linger-ms", "0"], env, log)
    consumer = _service(["consume", f"benchmarks.e2e_app:{handler}"], env, log)
    try:
        with Session(engine) as session, session.begin():  # the consumer has joined
            Outbox().publish(session, topic=topic, key="warm", type="Warm", payload={})
        _wait(engine, 1, 120, "the consumer applied no event within 120 s", log)
        writes = PacedWriter(url, topic, RATE, clock=time.time)
        writes.run()
        _wait(engine, len(writes.committed) + 1, 60,
              "not every event was applied within 60 s", log)
        applied = _applied(engine)
    finally:
        _stop(relay)
        _stop(consumer)
        engine.dispose()
    counted = writes.counted()
    sent = _sent(kafka, topic, len(applied))
    done = [(e, t) for e, t in counted.items() if e in applied]
    split = ([(applied[e] - t) * 1000 for e, t in done],
             [(sent[e] - t) * 1000 for e, t in done if e in sent],
             [(applied[e] - sent[e]) * 1000 for e, _ in done if e in sent])
    return split, writes.reached(), len(counted) - len(done)


#: The handler's two ways of writing its row, and when its stamp is taken.
HANDLERS = {"Applied": ("1 execute per event", "stamped at the handler's INSERT, before "
                        "the batch's commit"),
            "AppliedOrm": ("ORM add", "stamped at the flush, just before the commit")}


def run(db_url: str, kafka: str) -> list[Result]:
    results = []
    with topics(kafka) as new:
        for client in CLIENTS:
            for handler, (how, stamp) in HANDLERS.items():
                with database(db_url) as url:
                    (latencies, relay, consumer), reached, missing = measure(
                        url, kafka, new("e2e"), client, handler)
                parts = ", ".join(f"{what} p50 {percentile(v, 50):.1f} / p99 "
                                  f"{percentile(v, 99):.1f} ms" for what, v in
                                  (("commit to send", relay), ("send to effect", consumer))
                                  if v)
                note = (f"relay + consumer processes, both {client}; {stamp}; {parts}; reached "
                        f"{reached:,.0f}/s, {PER_TX[RATE]} per tx, {WRITERS[RATE]} writer "
                        f"threads, {len(latencies):,} events")
                if missing:
                    note += f", {missing} NOT APPLIED"
                label = f"commit-to-effect, {client}, {how}, {RATE:,}/s"
                p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                print(f"   {label}: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({note})", flush=True)
                results.append(Result(f"{label}, p50", p50, "ms", note=note,
                                      samples=latencies, target=("<=", 20.0)))
                results.append(Result(f"{label}, p99", p99, "ms", note=note,
                                      target=("<=", 100.0)))
    return results
