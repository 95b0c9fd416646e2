"""An idle relay truncates the drained events table (outbox.reclaim), and never an event:
not one committed, not one a writer is inserting, not one committing meanwhile."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.dburl import libpq_url
from outbox.publisher import InMemoryPublisher, Record
from outbox.reclaim import MAX_DEAD_ROWS, Reclaimer
from outbox.relay import Relay, RelayConfig
from outbox.schema import make_tables
from tests.integration.test_relay_cursor import _Paused


def _publish(engine: sa.Engine, box: Outbox, n: int, key: str = "k") -> list[str]:
    with Session(engine) as s, s.begin():
        return [str(box.publish(s, topic="t", key=f"{key}-{i % 50}", type="T",
                                payload={"i": i}).id) for i in range(n)]


def _conn(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(libpq_url(url), autocommit=True)


def _size(url: str) -> int:
    with _conn(url) as c:
        row = c.execute("SELECT pg_total_relation_size('outbox_events')").fetchone()
        assert row is not None
        return int(row[0])


def _ids(url: str) -> set[str]:
    with _conn(url) as c:
        return {str(r[0]) for r in c.execute("SELECT event_id FROM outbox_events")}


def _id(record: Record) -> str:
    return next(v.decode() for k, v in record.headers if k == "ce_id")


def _stats(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(n_live_tup, n_dead_tup) of the events table, read afresh."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute("SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables "
                       "WHERE relname = 'outbox_events'").fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the statistics never showed it"
        time.sleep(0.1)


@pytest.fixture
def box() -> Outbox:
    return Outbox()


def test_an_idle_relay_truncates_the_drained_vacuumed_table(
        db_url: str, engine: sa.Engine, box: Outbox) -> None:
    for _ in range(4):
        _publish(engine, box, 2000)
    publisher = InMemoryPublisher()
    relay = Relay(RelayConfig(db_url, poll_interval=0.05, reclaim_above_mb=0.1),
                  lambda: publisher)
    relay.reclaimer.every = 0.0
    try:
        while relay.step(wait=False):
            pass
        assert len(publisher.records) == 8000
        with _conn(db_url) as c:
            last = c.execute("SELECT max(position) FROM outbox_events").fetchone()
            c.execute("VACUUM outbox_events")
        drained = _size(db_url)
        assert drained > 100_000  # the dead rows' pages, kept after VACUUM
        relay.step(wait=True)  # idle: the reclaim runs before the wait
        assert relay.reclaimer.reclaimed == 1
        assert _size(db_url) < 64 * 1024
        assert relay._conn is not None  # its statement timeout is its own again
        assert relay._conn.execute("SHOW statement_timeout").fetchone() == ("30s",)
        # The positions' sequence is untouched: the next event comes after every old one,
        # and the relay (its cursors past the old positions) sends it.
        new = _publish(engine, box, 1)
        with _conn(db_url) as c:
            row = c.execute("SELECT position FROM outbox_events").fetchone()
        assert row is not None and last is not None and row[0] > (last[0] or 0)
        while relay.step(wait=False):
            pass
        assert [_id(r) for r in publisher.records[8000:]] == new
    finally:
        relay._close()


def test_a_live_row_or_an_inserting_writer_keeps_the_table(
        db_url: str, engine: sa.Engine, box: Outbox) -> None:
    reclaimer = Reclaimer(make_tables(), above_bytes=1, every=0.0)
    with _conn(db_url) as conn:
        kept = _publish(engine, box, 1)
        assert reclaimer.truncate_if_empty(conn) is None  # a committed row
        assert _ids(db_url) == set(kept)
        conn.execute("DELETE FROM outbox_events")
        patient = Reclaimer(make_tables(), above_bytes=1, locked_timeout_ms=10_000)
        with _Paused(engine, box, "k", "T"):  # inserted, not committed: it holds a lock
            started = time.monotonic()
            assert patient.truncate_if_empty(conn) is None
            assert time.monotonic() - started < 5.0  # NOWAIT: it did not queue for it
        assert len(_ids(db_url)) == 1  # the paused writer's event, committed after
        # a row kept after publishing (--retention) is a row too
        conn.execute("UPDATE outbox_events SET published_at = now()")
        assert reclaimer.truncate_if_empty(conn) is None
        assert len(_ids(db_url)) == 1


def test_unvacuumed_dead_rows_keep_the_table_until_vacuum(db_url: str, box: Outbox) -> None:
    """The statistics' gate: a table full of dead rows waits for VACUUM, so the check
    under the lock never has to read them while writers wait."""
    reclaimer = Reclaimer(make_tables(), above_bytes=1, every=0.0)
    n = MAX_DEAD_ROWS + 500
    with _conn(db_url) as conn:
        one_off = sa.create_engine(db_url, poolclass=sa.NullPool)  # stats sent on close
        _publish(one_off, box, n)
        one_off.dispose()
        _until(lambda: _stats(conn)[0] >= n)  # its backend reports the inserts as it exits
        conn.execute("DELETE FROM outbox_events")
        conn.execute("SELECT pg_stat_force_next_flush()")  # sent as the statement ends
        _until(lambda: _stats(conn)[0] == 0 and _stats(conn)[1] >= n)
        assert reclaimer.maybe(conn) is None  # not vacuumed: would scan while holding it
        assert reclaimer.reclaimed == 0
        conn.execute("VACUUM outbox_events")
        assert reclaimer.maybe(conn) is not None
        assert reclaimer.reclaimed == 1


def test_no_event_is_lost_to_truncations_racing_writers(
        db_url: str, engine: sa.Engine, box: Outbox) -> None:
    """Writers commit without pause while rows are deleted as a relay would and the
    table is truncated whenever it is found empty: every event committed is either
    deleted (published) or still in the table, none vanishes."""
    stop = threading.Event()
    written: list[str] = []
    deleted: set[str] = set()
    failed: list[BaseException] = []

    def write(i: int) -> None:
        try:
            while not stop.is_set():
                written.extend(_publish(engine, box, 1 + i % 3, key=f"w{i}"))
        except BaseException as exc:
            failed.append(exc)

    def delete() -> None:
        try:
            with _conn(db_url) as c:
                while not stop.is_set():
                    deleted.update(str(r[0]) for r in
                                   c.execute("DELETE FROM outbox_events RETURNING event_id"))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=delete))
    for t in threads:
        t.start()
    reclaimer = Reclaimer(make_tables(), above_bytes=1, every=0.0)
    try:
        with _conn(db_url) as conn:
            until = time.monotonic() + 4.0
            while time.monotonic() < until:
                reclaimer.truncate_if_empty(conn)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failed
    assert reclaimer.reclaimed > 0  # the race was run, not avoided
    assert len(written) > 100
    assert set(written) == deleted | _ids(db_url)


@pytest.fixture
def relay_without_truncate(db_url: str) -> Iterator[str]:
    name = f"outbox_relay_{uuid.uuid4().hex[:8]}"
    with _conn(db_url) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'pw'")  # type: ignore[arg-type]
        conn.execute(f"GRANT SELECT, UPDATE, DELETE ON outbox_events TO {name}")  # type: ignore[arg-type]
    yield make_url(db_url).set(username=name, password="pw").render_as_string(
        hide_password=False)
    with _conn(db_url) as conn:
        conn.execute(f"DROP OWNED BY {name}")  # type: ignore[arg-type]
        conn.execute(f"DROP ROLE {name}")  # type: ignore[arg-type]


def test_without_the_truncate_grant_the_relay_says_so_once_and_goes_on(
        relay_without_truncate: str, caplog: pytest.LogCaptureFixture) -> None:
    reclaimer = Reclaimer(make_tables(), above_bytes=1, every=0.0)
    with _conn(relay_without_truncate) as conn, caplog.at_level("INFO", "outbox.relay"):
        assert reclaimer.maybe(conn) is None
        assert reclaimer.maybe(conn) is None
    said = [r.getMessage() for r in caplog.records if "TRUNCATE" in r.getMessage()]
    assert len(said) == 1 and "may not TRUNCATE outbox_events" in said[0]
    assert reclaimer.above_bytes is None


def test_a_table_that_cannot_be_truncated_turns_reclaiming_off_with_one_warning(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    reclaimer = Reclaimer(make_tables(), above_bytes=1, every=0.0)
    with _conn(db_url) as conn, caplog.at_level("INFO", "outbox.relay"):
        conn.execute("CREATE TABLE audit (position bigint REFERENCES outbox_events)")
        assert reclaimer.truncate_if_empty(conn) is None
        assert reclaimer.maybe(conn) is None
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)  # restored
    said = [r for r in caplog.records if "not reclaiming" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"
    assert "FeatureNotSupported" in said[0].getMessage()
    assert reclaimer.above_bytes is None
