"""Run the outbox's own Alembic history (own version table) from any directory.

For an application with its own Alembic environment: call `upgrade(connection)` from
its env.py (or run `outbox db upgrade` beside it), and filter our tables out of its
autogenerate with `include_object`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, pool

from outbox.dburl import sqlalchemy_url
from outbox.schema import DEFAULT_PREFIX, validate_prefix


def alembic_config(prefix: str = DEFAULT_PREFIX, url: str | None = None) -> Config:
    import outbox.migrations as pkg

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(pkg.__file__).parent))
    if url:
        cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    cfg.attributes["outbox_prefix"] = validate_prefix(prefix)
    return cfg


def upgrade(
    target: str | Connection, *, revision: str = "head", prefix: str = DEFAULT_PREFIX
) -> None:
    """Create or migrate the outbox tables, on a URL or inside an open connection."""
    if isinstance(target, str):
        engine = create_engine(sqlalchemy_url(target), poolclass=pool.NullPool)
        try:
            with engine.begin() as conn:
                upgrade(conn, revision=revision, prefix=prefix)
        finally:
            engine.dispose()
        return
    cfg = alembic_config(prefix)
    cfg.attributes["connection"] = target
    command.upgrade(cfg, revision)


def downgrade(target: str | Connection, *, revision: str, prefix: str = DEFAULT_PREFIX) -> None:
    if isinstance(target, str):
        engine = create_engine(sqlalchemy_url(target), poolclass=pool.NullPool)
        try:
            with engine.begin() as conn:
                downgrade(conn, revision=revision, prefix=prefix)
        finally:
            engine.dispose()
        return
    cfg = alembic_config(prefix)
    cfg.attributes["connection"] = target
    command.downgrade(cfg, revision)


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any,
    prefix: str = DEFAULT_PREFIX,
) -> bool:
    """For the application's own env.py: keep autogenerate away from the outbox's tables."""
    table = obj if type_ == "table" else getattr(obj, "table", None)
    table_name = getattr(table, "name", name) or ""
    return not table_name.startswith(f"{prefix}_")
