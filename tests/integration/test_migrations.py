"""The Alembic history creates exactly `outbox.schema`'s metadata, on its own version table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import make_url

from outbox import migrate
from outbox.dburl import libpq_url
from outbox.schema import make_tables, metadata


@pytest.fixture
def empty_db_url(admin_url: str) -> Iterator[str]:
    """A database with nothing in it (not cloned from the migrated template)."""
    name = f"outbox_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrated_database_equals_the_metadata(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": "outbox_alembic_version"})
        diff = compare_metadata(ctx, metadata)
        tables = set(sa.inspect(conn).get_table_names())
    assert diff == []
    assert "alembic_version" not in tables
    assert "outbox_alembic_version" in tables


def test_cli_upgrade_works_from_any_directory_with_a_prefix(db_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "OUTBOX_DATABASE_URL": db_url}
    out = subprocess.run(
        [sys.executable, "-m", "outbox.cli", "db", "upgrade", "--table-prefix", "shop_outbox"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "***" in out.stdout and ":outbox@" not in out.stdout, "password must be masked"
    eng = sa.create_engine(db_url)
    try:
        with eng.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"version_table": "shop_outbox_alembic_version"})
            diff = compare_metadata(ctx, make_tables("shop_outbox").metadata)
            names = set(sa.inspect(conn).get_table_names())
    finally:
        eng.dispose()
    # The default-prefix tables from the template are there too: only compare ours.
    ours = [d for d in diff if "shop_outbox" in str(d)]
    assert ours == []
    assert {"shop_outbox_events", "shop_outbox_inbox", "shop_outbox_alembic_version"} <= names


def test_downgrade_removes_the_tables(db_url: str) -> None:
    migrate.downgrade(db_url, revision="base")
    eng = sa.create_engine(db_url)
    try:
        with eng.connect() as conn:
            names = set(sa.inspect(conn).get_table_names())
    finally:
        eng.dispose()
    assert not {n for n in names if n.startswith("outbox_") and n != "outbox_alembic_version"}
    migrate.upgrade(db_url)


# `outbox db upgrade`, started only when the file named by argv[1] appears, so that the
# processes (everything imported already) begin their migrations within milliseconds.
GATED_UPGRADE = """
import pathlib, sys, time
from outbox.cli import main
go = pathlib.Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
main(["db", "upgrade"])
"""


def test_concurrent_upgrades_all_succeed_once(empty_db_url: str, tmp_path: Path) -> None:
    """Deploys start several pods at once: each runs `outbox db upgrade`; all must succeed.

    Every DDL statement sleeps 0.2 s (an event trigger), so each migration takes seconds
    and all four overlap: without serialization, every run fails but one.
    """
    with psycopg.connect(libpq_url(empty_db_url), autocommit=True) as conn:
        conn.execute("CREATE FUNCTION slow_ddl() RETURNS event_trigger LANGUAGE plpgsql "
                     "AS $$ BEGIN PERFORM pg_sleep(0.2); END $$")
        conn.execute("CREATE EVENT TRIGGER slow_ddl ON ddl_command_start "
                     "EXECUTE FUNCTION slow_ddl()")
    go = tmp_path / "go"
    env = {**os.environ, "OUTBOX_DATABASE_URL": empty_db_url}
    procs = [subprocess.Popen([sys.executable, "-c", GATED_UPGRADE, str(go)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    time.sleep(3)  # imports done
    go.touch()
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    for code, out, err in results:
        assert code == 0, err
        assert "outbox tables at head" in out and "Traceback" not in err
    eng = sa.create_engine(empty_db_url)
    try:
        with eng.connect() as conn:
            versions = conn.execute(sa.text("SELECT version_num FROM outbox_alembic_version"))
            assert len(versions.all()) == 1
            diff = compare_metadata(MigrationContext.configure(
                conn, opts={"version_table": "outbox_alembic_version"}), metadata)
    finally:
        eng.dispose()
    assert diff == []


def test_upgrade_takes_a_lock_of_its_own_prefix(empty_db_url: str) -> None:
    """The lock serializes upgrades of one prefix only; another prefix is not held up."""
    assert migrate.lock_key("outbox") != migrate.lock_key("shop_outbox")
    eng = sa.create_engine(empty_db_url)
    try:
        with eng.connect() as holder:
            holder.execute(sa.text("SELECT pg_advisory_lock(:k)"),
                           {"k": migrate.lock_key("outbox")})
            migrate.upgrade(empty_db_url, prefix="shop_outbox")  # not blocked
            with eng.connect() as conn:
                conn.execute(sa.text("SET lock_timeout = 500"))
                with pytest.raises(sa.exc.OperationalError, match="lock timeout"):
                    migrate.upgrade(conn)  # blocked by the holder: the lock is taken
            holder.execute(sa.text("SELECT pg_advisory_unlock(:k)"),
                           {"k": migrate.lock_key("outbox")})
    finally:
        eng.dispose()
