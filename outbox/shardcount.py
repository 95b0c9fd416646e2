"""The shard count: shared state in the database, never a per-process setting.

A key's events go to shard `crc32(key) % N`, and each relay owns some of the N shards.
If a writer and a relay disagreed on N, events would land in shards nobody owns and
stay there. So N is the number of rows of `<prefix>_shards`: `outbox db upgrade
[--shards N]` sets it once, writers compute the shard inside their INSERT from that
table, relays read it when they connect, and `outbox db set-shards N` is the only way
to change it, and only while that is safe: no pending event (a key would change shards
with events still queued in the old one, and lose its order) and no live relay.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from outbox.errors import ConfigError
from outbox.schema import Tables
from outbox.store import MEMBER_LOCK, relay_namespace

DEFAULT_SHARDS = 16
MAX_SHARDS = 1024


def _check_range(n: int) -> int:
    if not isinstance(n, int) or not 1 <= n <= MAX_SHARDS:
        raise ConfigError(f"the shard count must be between 1 and {MAX_SHARDS}, got {n!r}")
    return n


def read(conn: Connection, tables: Tables) -> int:
    """The shard count of this outbox (0 if `outbox db upgrade` never set it)."""
    return int(conn.execute(text(f"SELECT count(*) FROM {tables.shards.name}")).scalar_one())


def configure(conn: Connection, tables: Tables, requested: int | None) -> int:
    """Called by `outbox db upgrade`: set the count on a new outbox, check it on an old one.

    Runs inside the migration's transaction (and its advisory lock).
    """
    if requested is not None:
        _check_range(requested)
    current = read(conn, tables)
    if current == 0:
        _resize(conn, tables, 0, requested or DEFAULT_SHARDS)
        return requested or DEFAULT_SHARDS
    if requested is not None and requested != current:
        raise ConfigError(
            f"this outbox has {current} shards, not {requested}; change the count with "
            f"`outbox db set-shards {requested}` (it needs an empty outbox and no relay)")
    return current


def change(conn: Connection, tables: Tables, n: int) -> int:
    """`outbox db set-shards N`: resize, only when no event and no relay can be stranded.

    The ACCESS EXCLUSIVE lock waits for every writer transaction that read the count
    (each holds ACCESS SHARE on the table until it commits) and holds new ones back
    until the change commits, so no event is written under the old count afterwards.
    """
    _check_range(n)
    sh, ev = tables.shards.name, tables.events.name
    conn.execute(text(f"LOCK TABLE {sh} IN ACCESS EXCLUSIVE MODE"))
    live_relays = conn.execute(text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = :ns "
        "AND objid = :member AND granted AND database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database())"),
        {"ns": relay_namespace(tables), "member": MEMBER_LOCK}).scalar_one()
    if live_relays:
        raise ConfigError(f"{live_relays} relay(s) are running: stop every relay first")
    pending = conn.execute(
        text(f"SELECT count(*) FROM {ev} WHERE published_at IS NULL")).scalar_one()
    if pending:
        raise ConfigError(
            f"{pending} events are still pending: a key's later events would go to another "
            "shard than its queued ones, out of order. Let the relays drain the outbox, stop "
            "them, then change the count")
    dead = conn.execute(text(f"SELECT count(*) FROM {tables.dead_letters.name}")).scalar_one()
    if dead:
        raise ConfigError(
            f"{dead} dead letters keep their shard numbers under the current count: retry "
            "them (and let the relays deliver them) or purge them first")
    current = read(conn, tables)
    _resize(conn, tables, current, n)
    return current


def _resize(conn: Connection, tables: Tables, current: int, n: int) -> None:
    sh = tables.shards.name
    if n > current:
        conn.execute(tables.shards.insert(), [{"shard": i} for i in range(current, n)])
    elif n < current:
        conn.execute(text(f"DELETE FROM {sh} WHERE shard >= :n"), {"n": n})


def mismatch(explicit: int | None, stored: int, who: str) -> None:
    """A count given explicitly (flag, argument) must agree with the database's."""
    if stored == 0:
        raise ConfigError(
            "the outbox has no shard count: run `outbox db upgrade` on this database first")
    if explicit is not None and explicit != stored:
        raise ConfigError(
            f"{who} was given {explicit} shards but this outbox has {stored} (set by "
            "`outbox db upgrade`); drop the setting to use the database's, or change it "
            "with `outbox db set-shards`")
