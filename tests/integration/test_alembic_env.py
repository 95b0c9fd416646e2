"""The advice of docs/upgrades.md for an application with its own Alembic environment
works as written.

A real `alembic init` project: its env.py calls `outbox.migrate.upgrade(connection)` and
passes `include_object=outbox.migrate.include_object`, then `alembic upgrade head` and
`alembic revision --autogenerate` run in a subprocess, as a user would run them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from outbox import migrate
from outbox.dburl import libpq_url

MODELS = '''
import sqlalchemy as sa

metadata = sa.MetaData()
orders = sa.Table("orders", metadata, sa.Column("id", sa.Integer, primary_key=True),
                  sa.Column("amount", sa.Numeric(12, 2), nullable=False))
'''


@pytest.fixture
def empty_db_url(admin_url: str) -> Iterator[str]:
    """A database with nothing in it (not cloned from the migrated template)."""
    name = f"outbox_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def alembic(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(project), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "alembic", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def make_project(tmp_path: Path, url: str) -> Path:
    """`alembic init`, then the two edits to the generated env.py that docs/upgrades.md shows."""
    project = tmp_path / "app"
    project.mkdir()
    init = alembic(project, "init", "migrations")
    assert init.returncode == 0, init.stderr
    ini = project / "alembic.ini"
    lines = [f"sqlalchemy.url = {url.replace('%', '%%')}" if line.startswith("sqlalchemy.url")
             else line for line in ini.read_text().splitlines()]
    ini.write_text("\n".join(lines) + "\n")
    (project / "myapp").mkdir()
    (project / "myapp" / "__init__.py").write_text("")
    (project / "myapp" / "models.py").write_text(MODELS)

    env_py = project / "migrations" / "env.py"
    text = env_py.read_text()
    generated = ("        context.configure(\n"
                 "            connection=connection, target_metadata=target_metadata\n"
                 "        )\n")
    assert generated in text, "alembic's env.py template changed; update this test"
    text = text.replace("target_metadata = None",
                        "import outbox.migrate\nfrom myapp.models import metadata as "
                        "target_metadata")
    text = text.replace(generated,
                        "        outbox.migrate.upgrade(connection)\n"
                        "        context.configure(\n"
                        "            connection=connection, target_metadata=target_metadata,\n"
                        "            include_object=outbox.migrate.include_object,\n"
                        "        )\n")
    env_py.write_text(text)
    return project


def table_names(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def test_own_alembic_env_upgrades_and_autogenerates(empty_db_url: str, tmp_path: Path) -> None:
    project = make_project(tmp_path, empty_db_url)

    first = alembic(project, "revision", "--autogenerate", "-m", "orders")
    assert first.returncode == 0, first.stderr
    assert "KeyError" not in first.stderr and "Traceback" not in first.stderr
    [orders_rev] = (project / "migrations" / "versions").glob("*_orders.py")
    ops = orders_rev.read_text()
    assert "op.create_table('orders'" in ops or 'op.create_table("orders"' in ops
    assert "outbox_" not in ops, "autogenerate must leave the outbox's tables alone"

    up = alembic(project, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert "Traceback" not in up.stderr
    names = table_names(empty_db_url)
    assert {"orders", "alembic_version", "outbox_events", "outbox_dead_letters",
            "outbox_shards", "outbox_inbox", "outbox_alembic_version"} <= names

    # With everything applied, a second autogenerate finds nothing to do, outbox included.
    again = alembic(project, "revision", "--autogenerate", "-m", "nothing")
    assert again.returncode == 0, again.stderr
    [empty_rev] = (project / "migrations" / "versions").glob("*_nothing.py")
    body = empty_rev.read_text()
    assert "op.create_table" not in body and "op.drop_table" not in body
    assert "outbox_" not in body
    assert "drop_index" not in body and "create_index" not in body

    # Both histories are recorded, each in its own version table.
    engine = sa.create_engine(empty_db_url)
    try:
        with engine.connect() as conn:
            ours = conn.scalar(sa.text("SELECT version_num FROM outbox_alembic_version"))
            mine = conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
    finally:
        engine.dispose()
    assert ours == ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
    assert mine and mine in orders_rev.read_text()
