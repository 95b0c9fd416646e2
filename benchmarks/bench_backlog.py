"""No slowdown as the backlog grows, and storage that stays bounded (confluent client).

- The drain rate of one relay at 20,000 pending (median of 3, each in a fresh database)
  and at 1,000,000 pending; the 1M rate is reported as a ratio to the 20k rate.
- With BENCH_STORAGE=1 (the default), three fill-and-drain cycles of 1,000,000 events
  on one table with autovacuum at the server's settings (printed): the table's size
  with its indexes after each drain, measured once autovacuum has had its turn (at
  most 3 min; the wait is printed) and the idle relay has had its chance to truncate
  the drained table (outbox.reclaim, at most 30 s more), and what autovacuum had done
  by then. Cycle 1 is also the 1M drain above. With BENCH_STORAGE=0 only cycle 1 runs.

The relay is stepped during each drain, so its rate is timed exactly, and runs its
idle loop between drains, as a deployed relay with nothing to send does: it polls, its
session writes (the shards' `relay_waiting` flag) while autovacuum works, and it
truncates the table once autovacuum has emptied it. Without that last step the indexes
would grow: VACUUM can hand a B-tree page it deletes back for reuse at once only if a
transaction that wrote ends after the deletion and before that index's scan is over
(docs/design.md, "Storage").

Backlogs are filled with COPY, on top of whatever the previous cycle left behind.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg

from benchmarks.common import Result, close, database, drain, fill, relay_for, sized, topics
from outbox.dburl import libpq_url
from outbox.relay import Relay

SMALL = sized(20_000)
LARGE = sized(1_000_000)
REPEATS = 3
CLIENT = "confluent"
AUTOVACUUM_WAIT = 180.0  # seconds: three naptimes at the default 1 min
RECLAIM_WAIT = 30.0  # seconds after autovacuum: three of the idle relay's looks
AUTOVACUUM = ("autovacuum", "autovacuum_naptime", "autovacuum_vacuum_threshold",
              "autovacuum_vacuum_scale_factor", "autovacuum_vacuum_insert_threshold",
              "autovacuum_vacuum_cost_delay", "autovacuum_vacuum_cost_limit")


def _cycles() -> int:
    return 3 if os.environ.get("BENCH_STORAGE", "1") not in ("0", "", "false", "no") else 1


def _settings(url: str) -> str:
    with psycopg.connect(libpq_url(url)) as conn:
        return ", ".join(f"{name.removeprefix('autovacuum_') or name}="
                         f"{conn.execute(f'SHOW {name}').fetchone()[0]}"  # type: ignore
                         for name in AUTOVACUUM)


def _storage(url: str, drained_at: datetime, relay: Relay) -> dict[str, Any]:
    """Size of outbox_events (table, indexes, total) and its vacuum statistics, once
    autovacuum has had its turn after the drain (at most AUTOVACUUM_WAIT seconds), and
    then the idle relay its chance to truncate the drained table (at most RECLAIM_WAIT).

    Only VACUUM makes a drained table's space reusable, and autovacuum visits each
    database once per naptime (1 min by default): a cycle that starts before that turn
    extends the table whatever the relay does. The relay truncates only a vacuumed
    table (outbox.reclaim). The waits are reported beside the size.
    """
    started = time.monotonic()
    reclaims = relay.reclaimer.reclaimed
    time.sleep(11.0)  # the relay's backend flushes its statistics within 10 s
    vacuumed_at: float | None = None
    while True:
        row = _read(url)
        if vacuumed_at is None and row[5] is not None and row[5] >= drained_at:
            vacuumed_at = time.monotonic()
        reclaimed = relay.reclaimer.reclaimed > reclaims
        now = time.monotonic()
        if reclaimed or now - started > AUTOVACUUM_WAIT + RECLAIM_WAIT or (
                vacuumed_at is not None and now - vacuumed_at > RECLAIM_WAIT):
            break
        time.sleep(2.0)
    row = _read(url)  # after the truncation, if there was one
    names = ("total", "table", "indexes", "n_live_tup", "n_dead_tup", "last_autovacuum",
             "autovacuum_count", "vacuum_count")
    return {**dict(zip(names, row, strict=True)), "vacuumed": vacuumed_at is not None,
            "waited": (vacuumed_at or now) - started, "reclaimed": reclaimed,
            "freed": relay.reclaimer.last_freed if reclaimed else 0}


def _read(url: str) -> tuple[Any, ...]:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute(
            "SELECT pg_total_relation_size('outbox_events'), "
            "pg_relation_size('outbox_events'), pg_indexes_size('outbox_events'), "
            "n_live_tup, n_dead_tup, last_autovacuum, autovacuum_count, vacuum_count "
            "FROM pg_stat_user_tables WHERE relname = 'outbox_events'").fetchone()
    assert row is not None
    return tuple(row)


def _mb(size: int) -> float:
    return size / 2**20


def _describe(s: dict[str, Any]) -> str:
    last = s["last_autovacuum"]
    return (f"{_mb(s['total']):.1f} MB (table {_mb(s['table']):.1f}, indexes "
            f"{_mb(s['indexes']):.1f}); n_live_tup {s['n_live_tup']:,}, n_dead_tup "
            f"{s['n_dead_tup']:,}, autovacuum_count {s['autovacuum_count']}, last_autovacuum "
            f"{last.strftime('%H:%M:%S') if last else 'never'}; "
            + (f"autovacuum's turn came {s['waited']:.0f}s after the drain" if s["vacuumed"]
               else f"no autovacuum within {s['waited']:.0f}s of the drain")
            + (f"; the relay truncated it, giving back {_mb(s['freed']):.1f} MB"
               if s["reclaimed"] else "; the relay did not truncate it"))


def small_rate(db_url: str, kafka: str, topic: str) -> tuple[float, list[float]]:
    rates = []
    for _ in range(REPEATS):
        with database(db_url) as url:
            relay = relay_for(url, kafka, CLIENT, topic)
            try:
                fill(url, topic, SMALL)
                rates.append(drain(relay, SMALL))
            finally:
                close(relay)
    return statistics.median(rates), rates


def cycles(db_url: str, kafka: str, topic: str, n: int) -> list[tuple[float, dict[str, Any]]]:
    """n fill-and-drain cycles of LARGE events on one table: (drain rate, storage) each."""
    out = []
    with database(db_url) as url:
        print(f"   autovacuum: {_settings(url)}", flush=True)
        # One relay for every cycle, idle between drains (a fill, the storage wait):
        # a lease long enough that its session outlives that (idle_session_timeout).
        relay = relay_for(url, kafka, CLIENT, topic, lease_seconds=120.0)
        try:
            for cycle in range(1, n + 1):
                filled = fill(url, topic, LARGE, start=(cycle - 1) * LARGE)
                rate = drain(relay, LARGE)
                with _idling(relay):
                    storage = _storage(url, datetime.now(UTC), relay)
                print(f"   cycle {cycle}: filled in {filled:.0f}s, drained at {rate:,.0f}/s; "
                      f"{_describe(storage)}", flush=True)
                out.append((rate, storage))
        finally:
            close(relay)
    return out


@contextlib.contextmanager
def _idling(relay: Relay) -> Iterator[None]:
    """The relay's own idle loop on a thread meanwhile (what `outbox relay` does with
    nothing to send); stopped, within one poll interval, before the next fill."""
    stop = threading.Event()
    failed: list[BaseException] = []

    def idle() -> None:
        try:
            while not stop.is_set():
                relay.step(wait=True)
        except BaseException as exc:  # reported by the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=idle, name="bench-idle-relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if failed:
        raise RuntimeError("the idle relay failed") from failed[0]


def run(db_url: str, kafka: str) -> list[Result]:
    with topics(kafka) as new:
        topic = new("backlog")
        small, rates = small_rate(db_url, kafka, topic)
        done = cycles(db_url, kafka, topic, _cycles())
    large = done[0][0]
    results = [
        Result(f"drain, {SMALL:,} pending", small, "events/s",
               note=f"{CLIENT}, median of {', '.join(f'{r:,.0f}' for r in rates)}"),
        Result(f"drain, {LARGE:,} pending", large, "events/s", f"drain at {SMALL:,} pending",
               small, note=f"rate({SMALL // 1000}k) / rate({LARGE // 1000}k) = "
               f"{small / large:.2f} (target <= 1.2)", target=(">=", 1 / 1.2)),
    ]
    first = done[0][1]["total"]
    for cycle, (rate, storage) in enumerate(done, start=1):
        note = (f"drained at {rate:,.0f}/s; dead {storage['n_dead_tup']:,}, "
                f"autovacuums {storage['autovacuum_count']}, measured "
                + (f"{storage['waited']:.0f}s after the drain, once autovacuum had run"
                   if storage["vacuumed"] else "with no autovacuum since the drain")
                + (f"; truncated by the idle relay ({_mb(storage['freed']):.1f} MB given "
                   "back)" if storage["reclaimed"] else "; not truncated"))
        if cycle == 1:
            results.append(Result("outbox_events + indexes after cycle 1", first / 1024,
                                  "kB", note=note))
        else:
            last = cycle == len(done)
            results.append(Result(
                f"outbox_events + indexes after cycle {cycle}", storage["total"] / 1024, "kB",
                "after cycle 1", first / 1024,
                note=note + (f"; cycle {cycle} <= cycle 1: "
                             f"{'yes' if storage['total'] <= first else 'NO'}" if last else ""),
                target=("<=", 1.0) if last else None))
    return results
