"""Run the outbox's own Alembic history (own version table) from any directory.

For an application with its own Alembic environment: call `upgrade(connection)` from
its env.py before its own `context.configure(...)` (or run `outbox db upgrade` beside
it), and filter our tables out of its autogenerate with `include_object`.

Upgrades of one table prefix are serialized by a transaction-scoped advisory lock, so
several `outbox db upgrade` started at once (one per pod of a deploy) all succeed.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, pool, text

from outbox.dburl import sqlalchemy_url
from outbox.schema import DEFAULT_PREFIX, validate_prefix


def alembic_config(prefix: str = DEFAULT_PREFIX, url: str | None = None) -> Config:
    """The outbox's own Alembic config, built in code: no alembic.ini, any working dir."""
    import outbox.migrations as pkg

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(pkg.__file__).parent))
    if url:
        cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    cfg.attributes["outbox_prefix"] = validate_prefix(prefix)
    return cfg


def lock_key(prefix: str = DEFAULT_PREFIX) -> int:
    """The advisory lock that serializes migrations of one prefix.

    A single bigint key, so it can never equal the two-int keys the writers and relays
    take (PostgreSQL keeps the two forms apart).
    """
    return zlib.crc32(f"outbox-migrate:{validate_prefix(prefix)}".encode())


def upgrade(
    target: str | Connection, *, revision: str = "head", prefix: str = DEFAULT_PREFIX,
    shards: int | None = None,
) -> None:
    """Create or migrate the outbox tables, on a URL or inside an open connection.

    On a connection outside a transaction, the migration runs in a transaction of its own
    and commits; inside one, it joins it and the caller commits. A new outbox gets
    `shards` shards (16 when None); on an existing one a different `shards` is a
    ConfigError (see outbox.shardcount).
    """
    _run(target, prefix, lambda cfg: command.upgrade(cfg, revision), shards=shards,
         set_shards=True)


def downgrade(target: str | Connection, *, revision: str, prefix: str = DEFAULT_PREFIX) -> None:
    """Migrate the outbox tables down to `revision` ("base" drops them)."""
    _run(target, prefix, lambda cfg: command.downgrade(cfg, revision))


def _run(target: str | Connection, prefix: str, step: Callable[[Config], None],
         shards: int | None = None, set_shards: bool = False) -> None:
    if isinstance(target, str):
        engine = create_engine(sqlalchemy_url(target), poolclass=pool.NullPool)
        try:
            with engine.connect() as conn:
                _run(conn, prefix, step, shards, set_shards)
        finally:
            engine.dispose()
        return
    cfg = alembic_config(prefix)
    cfg.attributes["connection"] = target
    own = not target.in_transaction()
    with target.begin() if own else contextlib.nullcontext():
        if target.dialect.name == "postgresql":
            # Held until this transaction ends: a second upgrade waits, then finds the
            # tables made and the version recorded, and has nothing left to do.
            target.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key(prefix)})
        with _alembic_proxies_kept():
            step(cfg)
        if set_shards:
            _configure_shards(target, prefix, shards)


def _configure_shards(conn: Connection, prefix: str, shards: int | None) -> None:
    from sqlalchemy import inspect

    from outbox import shardcount
    from outbox.schema import make_tables

    tables = make_tables(prefix)
    if inspect(conn).has_table(tables.shards.name):  # not after a downgrade to base
        shardcount.configure(conn, tables, shards)


@contextlib.contextmanager
def _alembic_proxies_kept() -> Iterator[None]:
    """Run a nested Alembic command without breaking the one that called us.

    `alembic.context` and `alembic.op` are module-level proxies: a command installs its
    EnvironmentContext there and removes it on exit. Called from an application's
    env.py, our command would remove the application's (`KeyError: 'script'`, or
    `context.configure` on None); put the caller's back afterwards.
    """
    import alembic.context
    import alembic.op

    outer = [getattr(module, "_proxy", None) for module in (alembic.context, alembic.op)]
    try:
        yield
    finally:
        for proxy in outer:
            if proxy is not None:
                proxy._install_proxy()


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any,
    prefix: str = DEFAULT_PREFIX,
) -> bool:
    """For the application's own env.py: keep autogenerate away from the outbox's tables."""
    table = obj if type_ == "table" else getattr(obj, "table", None)
    table_name = getattr(table, "name", name) or ""
    return not table_name.startswith(f"{prefix}_")
