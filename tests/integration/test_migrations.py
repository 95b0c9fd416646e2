"""The Alembic history creates exactly `outbox.schema`'s metadata, on its own version table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from outbox import migrate
from outbox.schema import make_tables, metadata


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
