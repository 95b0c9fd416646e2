"""The chaos run: the real system as processes under a seeded fault schedule, then a
checker over what happened.

    python -m tests.chaos.run --seed 1 --duration 600 [--min-faults-per-10min 50]
        [--unsafe ack|ordering|dedupe|shards|progress] [--exactly-once]

Writers (the decorator), 3 relays and 2 consumers run against the real PostgreSQL and
Kafka; relays reach both, and consumers reach Kafka, through TCP proxies this harness
owns. Faults, each kind on its own seeded schedule (tests/chaos/schedule.py): SIGKILL
of relays and consumers, SIGSTOP of a relay for longer than its lease, kill -9 of the
broker, PostgreSQL restarted with -m immediate, connections cut, blackholed or slowed
at the proxies, and faults aimed at each crash window of the design
(tests/chaos/faults.py). A supervisor restarts any relay or consumer that exits on its
own. Then everything heals, the outbox drains, and the checker compares Kafka and the
consumer's effects with what the database says committed. Exit 1 on any violation, or
when a kind of fault fell short of the floor. With --exactly-once the relays send in
Kafka transactions, the checker reads read_committed, and any duplicate in Kafka is a
violation ("duplicates delivered").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa
from kafka.admin import KafkaAdminClient, NewTopic
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from outbox import migrate
from outbox.backoff import first_line
from outbox.dburl import libpq_url, sqlalchemy_url
from tests.chaos import timeline
from tests.chaos.app import DDL
from tests.chaos.check import check, counts, load_committed, progress
from tests.chaos.faults import (
    AIM_LIMIT,
    CLUSTER_FLOORS_PER_10MIN,
    CLUSTER_KINDS,
    KINDS,
    LEASE,
    PRIOR_SECONDS,
    ROOT,
    WINDOW_KINDS,
    WINDOW_NOMINAL_PER_10MIN,
    WINDOW_PER_10MIN,
    Faults,
    Proc,
    Supervisor,
    stack,
)
from tests.chaos.proxy import ProxyGroup, TcpProxy
from tests.chaos.schedule import KindSchedule, floor_for, target_for

KAFKA_PROXIED_PORT = 9094  # the broker's PROXIED listener (scripts/kafka/server.properties)
KAFKA_PROXY_PORT = 9095  # advertised for that listener: where this harness listens
PG_PROXY_PORT = 25432
# The cluster's (scripts/stack_cluster.sh): broker N's PROXIED listener is 19291+N, and it
# advertises 19391+N, where this harness listens; PostgreSQL's two servers are proxied
# from 25532/25533 (the single-node run's proxies, above, are left alone).
CLUSTER_BROKERS = (1, 2, 3)
CLUSTER_PG_PROXIES = {15432: 25532, 15433: 25533}
DRAIN_LIMIT = 30.0  # seconds: on the cluster, the outbox must drain this soon after the faults
__all__ = ["KINDS", "WINDOW_KINDS", "Report", "print_summary", "run"]


@dataclass
class Report:
    seed: int
    duration: float
    unsafe: str | None
    exactly_once: bool = False  # relays send in transactions; Kafka read read_committed
    cluster: bool = False  # three brokers, a primary and a standby (scripts/stack --cluster)
    failovers: list[dict[str, float]] = field(default_factory=list)  # what each one cost
    unpublished_failovers: int = 0
    kinds: tuple[str, ...] = KINDS
    floors: dict[str, int] = field(default_factory=dict)  # the floor of each kind
    faults: Counter[str] = field(default_factory=Counter)  # faults that hit
    missed: Counter[str] = field(default_factory=Counter)  # tried, window not hit
    fault_seconds: dict[str, list[float]] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # counts about every second
    events_committed: int = 0
    records_in_kafka: int = 0
    lost: int = 0
    phantom: int = 0
    order_violations: int = 0
    double_applied: int = 0
    not_applied: int = 0
    duplicates_absorbed: int = 0
    duplicate_bursts: list[dict[str, Any]] = field(default_factory=list)
    drain_seconds: float | None = None
    outbox_left: int = 0
    exits: dict[str, int | None] = field(default_factory=dict)
    restarts: dict[str, list[int]] = field(default_factory=dict)  # unplanned exit codes
    truncations: int = 0  # drained tables the idle relays truncated (outbox.reclaim)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def violations(self) -> dict[str, int]:
        return {k: v for k, v in {
            "lost": self.lost, "phantom": self.phantom, "order_violations": self.order_violations,
            "double_applied": self.double_applied, "not_applied": self.not_applied,
            "outbox_left": self.outbox_left,
            # exactly-once: a read_committed consumer must see no event twice
            "duplicates_delivered": self.duplicates_absorbed if self.exactly_once else 0,
            # the cluster's target: drained within DRAIN_LIMIT s of the last fault
            "slow_drain": int(self.cluster and (self.drain_seconds is None
                                                or self.drain_seconds > DRAIN_LIMIT)),
            # a failover after which the relays published nothing new within 150 s
            "unpublished_failovers": self.unpublished_failovers,
        }.items() if v}

    @property
    def failover_cost(self) -> dict[str, dict[str, float]]:
        """Mean and max over the failovers: writes refused, and relays publishing again."""
        return {k: _stats([f[k] for f in self.failovers])
                for k in ("writes_refused_s", "relay_publish_s")}

    @property
    def short_of_floor(self) -> list[str]:
        return [k for k in self.kinds if self.faults[k] < self.floors.get(k, 0)]

    def as_dict(self) -> dict[str, object]:
        return {
            "seed": self.seed, "duration": self.duration, "unsafe": self.unsafe,
            "exactly_once": self.exactly_once, "cluster": self.cluster,
            "failovers": self.failovers, "failover_cost": self.failover_cost,
            "floors": self.floors, "faults": {k: self.faults[k] for k in self.kinds},
            "missed": {k: self.missed[k] for k in self.kinds if self.missed[k]},
            "fault_seconds": {k: _stats(v) for k, v in self.fault_seconds.items()},
            "events_committed": self.events_committed,
            "records_in_kafka": self.records_in_kafka, "lost": self.lost,
            "phantom": self.phantom, "order_violations": self.order_violations,
            "double_applied": self.double_applied, "not_applied": self.not_applied,
            "duplicates_absorbed": self.duplicates_absorbed,
            "duplicate_bursts": self.duplicate_bursts,
            "drain_seconds": self.drain_seconds, "outbox_left": self.outbox_left,
            "exit_codes": self.exits, "unplanned_exits": self.restarts,
            "truncations": self.truncations,
            "violations": self.violations, "short_of_floor": self.short_of_floor,
            "examples": self.examples, "timeline": self.timeline, "samples": self.samples,
        }


def _stats(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    return {"mean": round(sum(seconds) / len(seconds), 2), "max": round(max(seconds), 2)}


def run(seed: int, duration: float, *, unsafe: str | None = None, relays: int = 3,
        consumers: int = 2, writers: int = 2, rate: float = 60.0, min_per_10min: int = 0,
        kinds: tuple[str, ...] = KINDS, log: Callable[[str], None] = print,
        exactly_once: bool = False, cluster: bool = False,
        windows_each: int | None = None, random_each: int | None = None) -> Report:
    """Run the system under faults of `kinds` for `duration` seconds, then check it.

    With `min_per_10min`, each random kind has that floor per 600 s (pro rata) and each
    window kind WINDOW_PER_10MIN (at least 1); the report says which fell short. With
    `cluster`, on the topology of `scripts/stack --cluster` (its URLs in the environment),
    with its faults (CLUSTER_KINDS; floors of CLUSTER_FLOORS_PER_10MIN for its own).
    `windows_each` and `random_each` set how many faults each window kind and each
    random kind aim for (by default, their nominal rates per 600 s). Window faults take
    turns and wait for the servers, so fewer faults leave each more time to hit."""
    if os.environ.get("OUTBOX_UNSAFE_DISABLE"):
        raise SystemExit("unset OUTBOX_UNSAFE_DISABLE: the harness itself must keep every "
                         "mechanism; choose one to remove with --unsafe")
    admin_url = sqlalchemy_url(os.environ["OUTBOX_DATABASE_URL"])
    kafka = os.environ["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]
    run_id = f"{seed}-{uuid.uuid4().hex[:6]}"
    logs = ROOT / "reports" / f"chaos-{run_id}"
    logs.mkdir(parents=True, exist_ok=True)
    per_10min = {k: CLUSTER_FLOORS_PER_10MIN.get(k, min_per_10min) if cluster else min_per_10min
                 for k in kinds}
    floors = {k: 0 if not min_per_10min else
              max(1, floor_for(WINDOW_PER_10MIN, duration)) if k in WINDOW_KINDS else
              floor_for(per_10min[k], duration) for k in kinds}
    report = Report(seed=seed, duration=duration, unsafe=unsafe, kinds=kinds, floors=floors,
                    exactly_once=exactly_once, cluster=cluster)

    db = "outbox_chaos"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db}"')
    url = make_url(admin_url).set(database=db)
    direct_url = url.render_as_string(hide_password=False)
    if cluster:  # every server, through its proxy; libpq keeps the one that takes writes
        proxied_url = url.set(query={**url.query, "host": tuple(
            f"127.0.0.1:{p}" for p in CLUSTER_PG_PROXIES.values())}).render_as_string(
            hide_password=False)
    else:
        proxied_url = url.set(host="127.0.0.1", port=PG_PROXY_PORT).render_as_string(
            hide_password=False)
    migrate.upgrade(direct_url)
    with psycopg.connect(libpq_url(direct_url), autocommit=True) as conn:
        for ddl in DDL:
            conn.execute(ddl)
    topic = f"chaos-{run_id}"
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    admin.create_topics([NewTopic(topic, num_partitions=6,
                                  replication_factor=3 if cluster else 1)])
    admin.close()

    kafka_proxy: TcpProxy | ProxyGroup
    pg_proxy: TcpProxy | ProxyGroup
    broker_proxies: list[TcpProxy] | None = None
    if cluster:
        broker_proxies = [TcpProxy(19391 + n, 19291 + n, f"kafka-{n}", kafka=True)
                          for n in CLUSTER_BROKERS]
        kafka_proxy = ProxyGroup(broker_proxies, "kafka")
        pg_proxy = ProxyGroup([TcpProxy(listen, port, f"postgres-{port}")
                               for port, listen in CLUSTER_PG_PROXIES.items()], "postgres")
        proxied_kafka = ",".join(f"127.0.0.1:{19391 + n}" for n in CLUSTER_BROKERS)
    else:
        pg_port = make_url(admin_url).port or 5432
        kafka_proxy = TcpProxy(KAFKA_PROXY_PORT, KAFKA_PROXIED_PORT, "kafka", kafka=True)
        pg_proxy = TcpProxy(PG_PROXY_PORT, pg_port, "postgres")
        proxied_kafka = f"127.0.0.1:{KAFKA_PROXY_PORT}"
    proxies = [kafka_proxy, pg_proxy]
    base_env = {**os.environ, "PYTHONPATH": str(ROOT), "CHAOS_TOPIC": topic,
                "CHAOS_GROUP": f"chaos-{run_id}", "OUTBOX_LOG_LEVEL": "INFO"}
    base_env.pop("OUTBOX_FAULT_CRASH", None)
    base_env.pop("OUTBOX_EXACTLY_ONCE", None)

    def env_for(part: str) -> dict[str, str]:
        wanted = {"ordering": "writer", "ack": "relay", "shards": "relay", "dedupe": "consumer",
                  "progress": "relay"}
        env = dict(base_env)
        if exactly_once and part == "relay":
            env["OUTBOX_EXACTLY_ONCE"] = "1"
        if unsafe and wanted[unsafe] == part:
            env["OUTBOX_UNSAFE_DISABLE"] = unsafe
        return env

    children: list[Proc] = []  # killed if the run fails half-way, so none outlives it
    supervisor: Supervisor | None = None
    stop = threading.Event()
    try:
        py = sys.executable
        writer_procs = [Proc(f"writer-{i}", [py, "-m", "tests.chaos.app", "writer", "--db",
                                              direct_url, "--topic", topic, "--rate",
                                              str(rate / writers), "--seed", str(seed * 10 + i)],
                             env_for("writer"), logs) for i in range(writers)]
        relay_procs = [Proc(f"relay-{i}", [py, "-m", "outbox.cli", "relay", "--db", proxied_url,
                                            "--kafka", proxied_kafka,
                                            "--lease", str(LEASE), "--poll-interval", "0.5",
                                            # truncate whenever drained and vacuumed, so
                                            # truncations meet the faults too
                                            "--reclaim-above-mb", "0.001",
                                            # sends fail during a broker outage: retry paths run
                                            "--delivery-timeout-ms", "4000",
                                            "--relay-id", f"relay-{i}"],
                            env_for("relay"), logs) for i in range(relays)]
        consumer_procs = [Proc(f"consumer-{i}", [py, "-m", "outbox.cli", "consume",
                                                  "tests.chaos.app:Effects", "--db", direct_url,
                                                  "--kafka", proxied_kafka,
                                                  "--session-timeout-ms", "6000"],
                               env_for("consumer"), logs) for i in range(consumers)]
        children += writer_procs + relay_procs + consumer_procs
        supervisor = Supervisor(relay_procs + consumer_procs, log)
        # The harness's own writer, for the ordering race: straight to PostgreSQL, never
        # through the proxy that holds the relays back.
        engine = sa.create_engine(direct_url, pool_size=2, pool_pre_ping=True, connect_args={
            "connect_timeout": 5, "options": "-c statement_timeout=15000"})
        faults = Faults(relays=relay_procs, consumers=consumer_procs, kafka_proxy=kafka_proxy,
                        pg_proxy=pg_proxy, factory=sessionmaker(engine), topic=topic,
                        unsafe=unsafe, stop=stop, trace=logs / "faults.log",
                        exactly_once=exactly_once, broker_proxies=broker_proxies,
                        probe_factory=sessionmaker(sa.create_engine(
                            direct_url, poolclass=sa.pool.NullPool, connect_args={
                                "connect_timeout": 1,
                                "options": "-c statement_timeout=5000"})) if cluster else None)
        lock = threading.Lock()
        def target(k: str) -> int:
            if k in WINDOW_KINDS:
                return windows_each if windows_each is not None else \
                    target_for(floors[k], duration, WINDOW_NOMINAL_PER_10MIN)
            if cluster and k in CLUSTER_FLOORS_PER_10MIN:
                return target_for(floors[k], duration, per_10min[k])
            return random_each if random_each is not None else target_for(floors[k], duration)

        targets = {k: target(k) for k in kinds}
        schedules = {k: KindSchedule(duration, targets[k], PRIOR_SECONDS[k],
                                     miss=AIM_LIMIT if k in WINDOW_KINDS else 0.0)
                     for k in kinds}
        warned: set[str] = set()
        started = time.monotonic()
        started_wall = time.time()

        def elapsed() -> float:
            return time.monotonic() - started

        sampling = threading.Event()  # set when the drain is over
        sampler = threading.Thread(target=sample_counts, daemon=True, name="sampler",
                                   args=(direct_url, elapsed, sampling, report.samples))
        sampler.start()

        def faults_of(kind: str) -> None:
            rng = random.Random(f"{seed}-{kind}")
            sched = schedules[kind]
            while elapsed() < duration:
                if stop.wait(sched.next_delay(elapsed(), rng.random())) or elapsed() >= duration:
                    return
                at = elapsed()
                try:
                    hit, detail = faults.inject(kind, rng)
                except Exception as exc:  # a fault that could not be injected is reported
                    hit, detail = False, f"failed: {first_line(exc)}"
                    log(f"  fault {kind} failed: {first_line(exc)}")
                seconds = elapsed() - at
                with lock:
                    sched.finished(seconds, hit)
                    report.timeline.append({"kind": kind, "at": round(at, 2),
                                            "seconds": round(seconds, 2), "hit": hit,
                                            "detail": detail})
                    if hit:
                        report.faults[kind] += 1
                    else:
                        report.missed[kind] += 1
                    floor = floors[kind]
                    if floor and kind not in warned and not sched.feasible(elapsed(), floor):
                        warned.add(kind)
                        log(f"  WARNING: {kind} cannot reach the floor at this pace: "
                            f"{report.faults[kind]}/{floor} done, {sched.expected:.1f} s per "
                            f"fault, {duration - elapsed():.0f} s left")

        log(f"chaos seed={seed} duration={duration:.0f}s unsafe={unsafe or '-'} logs={logs}")
        for group in (tuple(k for k in kinds if k not in WINDOW_KINDS), WINDOW_KINDS):
            chosen = [k for k in group if k in kinds]
            if not chosen:
                continue
            k0 = chosen[0]
            floor = floors[k0]
            log(f"  {'window' if group is WINDOW_KINDS else 'random'} faults: {targets[k0]} of "
                f"each of {len(chosen)} kinds (a slot of {duration / targets[k0]:.1f} s)"
                + (f"; floor {floor} each: feasible while a fault takes <= "
                   f"{duration / floor:.1f} s" if floor else ""))
            own = [f"{k}: {targets[k]} (floor {floors[k]})" for k in chosen
                   if targets[k] != targets[k0]]
            if own:
                log(f"  of their own: {', '.join(own)}")
            risky = [f"{k} (~{PRIOR_SECONDS[k]:.0f} s)" for k in chosen
                     if floors[k] and PRIOR_SECONDS[k] > duration / floors[k]]
            if risky:
                log(f"  at risk of missing the floor: {', '.join(risky)}")
        threads = [threading.Thread(target=faults_of, args=(k,), daemon=True, name=k)
                   for k in kinds]
        for t in threads:
            t.start()
        while elapsed() < duration:
            time.sleep(min(10.0, max(0.0, duration - elapsed())))
            with lock:
                log(f"  {elapsed():5.0f}s faults so far: "
                    + " ".join(f"{k}={report.faults[k]}" for k in kinds))
        stop.set()
        for t in threads:
            t.join(90)
        for t in threads:
            if t.is_alive():
                log(f"  fault thread {t.name} still running after the end")
        for k, s in schedules.items():
            report.fault_seconds[k] = s.durations

        # Heal everything, stop writing, let the system drain.
        for proxy in proxies:
            proxy.heal()
        stack("up", cluster=cluster)
        for p in relay_procs + consumer_procs:
            p.ensure_running()
        for w in writer_procs:
            report.exits[w.name] = w.terminate()
        drain_started = time.monotonic()
        committed = load_committed(direct_url)
        report.events_committed = len(committed)
        # Drained: the outbox is empty and every committed event applied. An event lost for
        # good (UNSAFE=ack) never arrives: give up once the outbox is empty and nothing was
        # applied for 30 s, instead of waiting out the deadline.
        deadline = drain_started + 300
        last_applied, moved = -1, time.monotonic()
        while time.monotonic() < deadline:
            left, applied = progress(direct_url)
            if left == 0 and applied >= len(committed):
                report.drain_seconds = round(time.monotonic() - drain_started, 1)
                break
            if applied != last_applied or left != 0:
                last_applied, moved = applied, time.monotonic()
            elif time.monotonic() - moved > 30:
                log(f"  drain: outbox empty, {len(committed) - applied} events never applied")
                break
            time.sleep(1)
        sampling.set()
        sampler.join(10)
        supervisor.stop()
        report.restarts = dict(supervisor.exits)
        faults.join_measurements()
        report.failovers = faults.failovers
        report.unpublished_failovers = len(faults.unpublished_failovers)
        for p in relay_procs + consumer_procs:
            report.exits[p.name] = p.terminate()
        report.truncations = sum(p.log.read_text(errors="replace").count(
            "reclaimed the drained") for p in relay_procs if p.log.exists())
        for proxy in proxies:
            proxy.close()
        engine.dispose()
        found = check(direct_url, kafka, topic, committed, report.timeline, started_wall,
                      read_committed=exactly_once)
        if found.lost or found.phantom or found.order_violations or (
                exactly_once and found.duplicates):
            log(f"  topic {topic} and database {db} kept as evidence")
        else:
            try:  # every topic left behind makes each later broker restart slower
                admin = KafkaAdminClient(bootstrap_servers=kafka)
                admin.delete_topics([topic])
                admin.close()
            except Exception as exc:
                log(f"  could not delete topic {topic}: {first_line(exc)}")
        report.records_in_kafka = found.records
        report.lost, report.phantom = len(found.lost), len(found.phantom)
        report.order_violations = found.order_violations
        report.double_applied = len(found.double_applied)
        report.not_applied = found.not_applied
        report.outbox_left = found.outbox_left
        report.duplicates_absorbed = found.duplicates
        report.duplicate_bursts = found.bursts
        report.examples = {
            "lost": sorted(found.lost)[:5], "phantom": sorted(found.phantom)[:5],
            "order_violation_keys": found.order_examples,
            "keys_out_of_order": found.order_keys[:100],
            "double_applied": found.double_applied[:5],
        }
    except BaseException:
        stop.set()
        if supervisor is not None:
            supervisor.stop()
        for child in children:
            child.signal(signal.SIGCONT)
            child.kill()
        for proxy in proxies:
            proxy.close()
        raise
    (logs / "summary.json").write_text(json.dumps(report.as_dict(), indent=2))
    return report


def sample_counts(url: str, elapsed: Callable[[], float], done: threading.Event,
                  out: list[dict[str, Any]], interval: float = 1.0) -> None:
    """Append the timeline's counts (check.counts) with their time every `interval` s
    until `done`; while the database is away there is no sample (a gap in the picture)."""
    conn: psycopg.Connection[Any] | None = None
    while not done.is_set():
        at = elapsed()
        try:
            if conn is None or conn.closed or conn.broken:
                conn = psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=2)
            out.append({"at": round(at, 2), **counts(conn)})
        except psycopg.Error:
            if conn is not None:
                conn.close()
            conn = None
        done.wait(max(0.0, interval - (elapsed() - at)))
    if conn is not None:
        conn.close()


def print_summary(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"chaos run: seed {report.seed}, {report.duration:.0f} s"
             + (", exactly-once" if report.exactly_once else "")
             + (f", UNSAFE without {report.unsafe}" if report.unsafe else ""))
    faults = Table(title=f"{title}: faults")
    for col in ("kind", "injected", "missed", "mean s", "max s", "floor"):
        faults.add_column(col, justify="left" if col == "kind" else "right")
    for kind in report.kinds:
        st = _stats(report.fault_seconds.get(kind, []))
        floor = report.floors.get(kind, 0)
        faults.add_row(kind, str(report.faults[kind]), str(report.missed[kind]),
                       str(st.get("mean", "-")), str(st.get("max", "-")),
                       str(floor) + (" SHORT" if report.faults[kind] < floor else ""))
    table = Table(title=f"{title}: invariants")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("events written (committed)", report.events_committed),
        ("records in Kafka", report.records_in_kafka),
        ("lost", report.lost), ("phantom", report.phantom),
        ("order violations", report.order_violations),
        ("double-applied", report.double_applied), ("not applied", report.not_applied),
        ("duplicates delivered" + (" (read_committed)" if report.exactly_once
                                   else " and absorbed"), report.duplicates_absorbed),
        ("outbox left", report.outbox_left),
        ("drain time", f"{report.drain_seconds} s" if report.drain_seconds is not None
         else "did not drain"),
        ("unplanned exits (restarted)", sum(len(v) for v in report.restarts.values())),
        ("drained table truncated by a relay", report.truncations),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    if report.cluster:
        cost = report.failover_cost
        for name, key in (("failover: writes refused", "writes_refused_s"),
                          ("failover: until the relays published again", "relay_publish_s")):
            st = cost[key]
            table.add_row(name + " (mean / max)",
                          f"{st['mean']} s / {st['max']} s" if st else "no failover")
    console = Console()
    console.print(faults)
    console.print(table)
    for b in report.duplicate_bursts[:5]:
        console.print(f"duplicate burst: {b['count']} sent again at {b['again_sent_s']} s "
                      f"(first sent at {b['first_copies_sent_s']} s, producer retries "
                      f"{b['producer_retries']}); faults around: {b['faults_around'][:6]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=120)
    parser.add_argument("--unsafe", choices=["ack", "ordering", "dedupe", "shards", "progress"])
    parser.add_argument("--exactly-once", action="store_true",
                        help="relays with --exactly-once; the checker reads read_committed "
                             "and counts any duplicate as a violation")
    parser.add_argument("--min-faults-per-10min", type=int, default=0, metavar="N",
                        help="fail unless every kind of fault hit N times per 600 s of run "
                             "(pro rata, rounded down); the schedule aims above it")
    parser.add_argument("--cluster", action="store_true",
                        help="on the topology of `scripts/stack --cluster` (its URLs in the "
                             "environment), with its faults; the outbox must drain within "
                             f"{DRAIN_LIMIT:.0f} s")
    parser.add_argument("--kinds", metavar="KIND,...",
                        help="only these kinds of fault (default: all of the topology's)")
    args = parser.parse_args()
    if args.duration <= 0 or args.min_faults_per_10min < 0:
        parser.error("--duration must be positive and --min-faults-per-10min not negative")
    known = CLUSTER_KINDS if args.cluster else KINDS
    wanted = args.kinds.split(",") if args.kinds else list(known)
    kinds = tuple(k for k in known if k in wanted)
    unknown = set(wanted) - set(known)
    if unknown or not kinds:
        parser.error(f"unknown kinds {sorted(unknown)}; known: {', '.join(known)}")
    # Terminated, the run still kills its processes (run() cleans up on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run(args.seed, args.duration, unsafe=args.unsafe,
                 min_per_10min=args.min_faults_per_10min, kinds=kinds,
                 exactly_once=args.exactly_once, cluster=args.cluster)
    print_summary(report)
    out = ROOT / "reports" / f"chaos-seed{args.seed}.json"
    out.write_text(json.dumps(report.as_dict(), indent=2))
    print(f"written: {out}")
    drawn = timeline.draw_or_skip(report.as_dict(), timeline.png_for(out))
    if drawn:
        print(f"timeline: {drawn}")
    if report.violations:
        print(f"VIOLATIONS: {report.violations}  examples: {report.examples}")
    if report.short_of_floor:
        print("too few faults of kinds "
              + ", ".join(f"{k} ({report.faults[k]} < {report.floors[k]})"
                          for k in report.short_of_floor))
    return 1 if report.violations or report.short_of_floor else 0


if __name__ == "__main__":
    sys.exit(main())
