"""The outbox's tables, as SQLAlchemy Core metadata (the migrations create exactly these).

Nothing here touches a database: tables are created by `outbox db upgrade`, never at import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sqlalchemy as sa

from outbox.errors import ConfigError

DEFAULT_PREFIX = "outbox"
# fullmatch, never `$`: `$` also matches before a trailing newline.
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,39}")

# BIGSERIAL on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def validate_prefix(prefix: str) -> str:
    """Table names are spliced into DDL and SQL, so they must be plain identifiers."""
    if not isinstance(prefix, str) or not _IDENT.fullmatch(prefix):
        raise ConfigError(
            f"invalid table prefix {prefix!r}: use 1 to 40 lowercase letters, digits "
            "and '_', starting with a letter or '_'"
        )
    return prefix


@dataclass(frozen=True)
class Tables:
    """The outbox's tables under one prefix, bound to their own MetaData."""

    prefix: str
    metadata: sa.MetaData
    events: sa.Table
    dead_letters: sa.Table
    shards: sa.Table
    inbox: sa.Table
    attempts: sa.Table

    @property
    def lock_namespace(self) -> int:
        """First key of the advisory locks this outbox takes (a stable int32 per prefix)."""
        import zlib

        return zlib.crc32(f"outbox:{self.prefix}".encode()) & 0x7FFFFFFF

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel relays wait on."""
        return f"{self.prefix}_events"


def _event_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=True),
        sa.Column("occurred_at", Timestamp, nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    ]


def make_tables(prefix: str = DEFAULT_PREFIX) -> Tables:
    """Build the table definitions for `prefix` (validated as an SQL identifier)."""
    p = validate_prefix(prefix)
    md = sa.MetaData()
    events = sa.Table(
        f"{p}_events",
        md,
        # The relay's order within a shard. Write-time ordering (writer.py) makes this
        # the commit order for any one key.
        sa.Column("position", Position, primary_key=True, autoincrement=True),
        *_event_columns(),
        sa.Column("next_attempt_at", Timestamp, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        # Set instead of deleting when the relay keeps published events for a while.
        sa.Column("published_at", Timestamp, nullable=True),
        sa.Index(
            f"ix_{p}_events_pending",
            "shard",
            "position",
            postgresql_where=sa.text("published_at IS NULL"),
            sqlite_where=sa.text("published_at IS NULL"),
        ),
        sa.Index(
            f"ix_{p}_events_published",
            "position",
            postgresql_where=sa.text("published_at IS NOT NULL"),
            sqlite_where=sa.text("published_at IS NOT NULL"),
        ),
    )
    dead_letters = sa.Table(
        f"{p}_dead_letters",
        md,
        sa.Column("position", Position, primary_key=True, autoincrement=False),
        *_event_columns(),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("failed_at", Timestamp, nullable=False),
        sa.Index(f"ix_{p}_dead_letters_event_id", "event_id"),
    )
    shards = sa.Table(
        f"{p}_shards",
        md,
        sa.Column("shard", sa.SmallInteger(), primary_key=True, autoincrement=False),
        # The owning relay sets this while it sleeps, so writers NOTIFY only when it helps.
        sa.Column("relay_waiting", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.Column("owner_since", Timestamp, nullable=True),
    )
    inbox = sa.Table(
        f"{p}_inbox",
        md,
        sa.Column("consumer_group", sa.Text(), primary_key=True),
        sa.Column("event_id", sa.Uuid(), primary_key=True),
        sa.Column("processed_at", Timestamp, nullable=False),
        sa.Index(f"ix_{p}_inbox_processed_at", "processed_at"),
    )
    # A consumer's failed handler attempts per event, so `max_attempts` counts across
    # restarts and rebalances (outbox.consumer.inbox); a row lives only while its event
    # is being retried.
    attempts = sa.Table(
        f"{p}_attempts",
        md,
        sa.Column("consumer_group", sa.Text(), primary_key=True),
        sa.Column("event_id", sa.Uuid(), primary_key=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.Index(f"ix_{p}_attempts_updated_at", "updated_at"),
    )
    return Tables(p, md, events, dead_letters, shards, inbox, attempts)


#: The default tables (prefix "outbox"): what `outbox db upgrade` creates.
tables = make_tables()
metadata = tables.metadata
