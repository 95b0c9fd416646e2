"""The shard count is shared state in the database: no writer or relay can strand an event.

The probe that found the hole: a relay started with `--shards 4` beside writers on 16
was accepted, and 51 of 64 events sat in shards nobody owned.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox import ConfigError, Outbox, migrate
from outbox.dburl import libpq_url
from outbox.keys import shard_of
from outbox.publisher import InMemoryPublisher
from outbox.relay import Relay, RelayConfig
from outbox.schema import tables
from outbox.testing import drain


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "outbox.cli", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def empty_db_url(admin_url: str) -> Iterator[str]:
    name = f"outbox_s_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def write(engine: sa.Engine, n: int, box: Outbox | None = None) -> None:
    box = box or Outbox()
    with Session(engine) as s, s.begin():
        for i in range(n):
            box.publish(s, topic="t", key=f"key-{i}", type="T", payload={"i": i})


def stored_shards(engine: sa.Engine) -> list[tuple[str, int]]:
    with engine.connect() as c:
        return [(r.key, r.shard) for r in c.execute(sa.select(tables.events.c.key,
                                                              tables.events.c.shard))]


def test_db_upgrade_sets_the_count_and_writers_follow_it(empty_db_url: str) -> None:
    out = cli("db", "upgrade", "--db", empty_db_url, "--shards", "4")
    assert out.returncode == 0, out.stderr
    engine = sa.create_engine(empty_db_url)
    try:
        write(engine, 64)  # Outbox() with no count: the database's
        rows = stored_shards(engine)
        assert len(rows) == 64 and all(shard == shard_of(key, 4) for key, shard in rows)
        # a second upgrade with another count is refused, clearly, and changes nothing
        again = cli("db", "upgrade", "--db", empty_db_url, "--shards", "16")
        assert again.returncode != 0 and "has 4 shards, not 16" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr
        assert cli("db", "upgrade", "--db", empty_db_url).returncode == 0  # no count: fine
    finally:
        engine.dispose()


def test_a_relay_or_writer_given_another_count_is_refused_and_nothing_strands(
    engine: sa.Engine, db_url: str
) -> None:
    write(engine, 64)  # the database has 16 shards
    with pytest.raises(ConfigError, match="given 4 shards but this outbox has 16"):
        drain(db_url, InMemoryPublisher(), config=RelayConfig(db_url=db_url, num_shards=4))
    with Session(engine) as s:
        s.add_all([])  # a writer told 4 fails at commit, and writes nothing at all
        s.execute(sa.text("CREATE TABLE IF NOT EXISTS app_rows (x int)"))
        s.commit()
    with pytest.raises(ConfigError, match="given 4 shards"), Session(engine) as s:
        s.execute(sa.text("INSERT INTO app_rows VALUES (1)"))
        Outbox(num_shards=4).publish(s, topic="t", key="k", type="T", payload={})
        s.commit()
    with engine.connect() as c:
        assert c.scalar(sa.text("SELECT count(*) FROM app_rows")) == 0
    publisher = InMemoryPublisher()
    assert drain(db_url, publisher) == 64  # the relay that reads the count takes them all
    assert stored_shards(engine) == []
    write(engine, 3, Outbox(num_shards=16))  # agreeing explicitly is fine
    assert len(stored_shards(engine)) == 3


def test_set_shards_refuses_while_unsafe_and_changes_the_count_when_safe(
    engine: sa.Engine, db_url: str
) -> None:
    write(engine, 10)
    busy = cli("db", "set-shards", "--db", db_url, "4")
    assert busy.returncode != 0 and "10 events are still pending" in busy.stderr, busy.stderr
    drain(db_url, InMemoryPublisher())
    relay = Relay(RelayConfig(db_url=db_url, poll_interval=0.1), InMemoryPublisher)
    thread = threading.Thread(target=relay.run)
    thread.start()
    try:
        while not relay.owned_shards:
            thread.join(0.05)
        running = cli("db", "set-shards", "--db", db_url, "4")
        assert running.returncode != 0 and "relay(s) are running" in running.stderr
    finally:
        relay.stop()
        thread.join(10)
    done = cli("db", "set-shards", "--db", db_url, "4")
    assert done.returncode == 0 and "16 -> 4" in done.stdout, done.stderr
    write(engine, 64)
    assert all(shard == shard_of(key, 4) for key, shard in stored_shards(engine))
    assert drain(db_url, InMemoryPublisher()) == 64


def test_status_flags_pending_events_no_relay_owns(engine: sa.Engine, db_url: str) -> None:
    write(engine, 20)
    out = cli("status", "--db", db_url)
    assert out.returncode == 0, out.stderr
    assert "NO OWNER" in out.stdout and "warning: pending events in" in out.stdout, out.stdout
    with engine.begin() as c:  # as an old writer with a larger count would have left them
        c.execute(sa.text("UPDATE outbox_events SET shard = 20 WHERE key = 'key-1'"))
    out = cli("status", "--db", db_url)
    assert "OUTSIDE THE SHARD COUNT" in out.stdout, out.stdout


def test_migrate_upgrade_in_python_takes_the_count(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url, shards=2)
    with pytest.raises(ConfigError, match="has 2 shards, not 3"):
        migrate.upgrade(empty_db_url, shards=3)


def test_tables_without_a_count_are_a_clear_error_at_commit(empty_db_url: str) -> None:
    engine = sa.create_engine(empty_db_url)
    try:
        tables.metadata.create_all(engine)  # the tables, but never `outbox db upgrade`
        with pytest.raises(ConfigError, match="run `outbox db upgrade`"), Session(engine) as s:
            Outbox().publish(s, topic="t", key="k", type="T", payload={})
            s.commit()
        assert stored_shards(engine) == []
    finally:
        engine.dispose()


def test_set_shards_refuses_while_dead_letters_exist(engine: sa.Engine, db_url: str) -> None:
    write(engine, 1)
    with engine.begin() as c:  # as the relay does for an event Kafka refused
        c.execute(sa.text(
            "WITH moved AS (DELETE FROM outbox_events RETURNING *) INSERT INTO "
            "outbox_dead_letters (position, event_id, topic, key, type, payload, "
            "content_type, source, headers, occurred_at, shard, attempts, error, failed_at) "
            "SELECT position, event_id, topic, key, type, payload, content_type, source, "
            "headers, occurred_at, shard, attempts, 'refused', now() FROM moved"))
    out = cli("db", "set-shards", "--db", db_url, "4")
    assert out.returncode != 0 and "1 dead letters" in out.stderr, out.stderr
    assert cli("dead-letters", "purge", "--all", "--db", db_url).returncode == 0
    assert cli("db", "set-shards", "--db", db_url, "4").returncode == 0
