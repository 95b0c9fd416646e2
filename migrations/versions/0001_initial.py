"""The outbox's tables: events, dead letters, shards, the consumers' inbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from outbox.migrations import prefix

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def _event_columns() -> list[sa.Column]:  # type: ignore[type-arg]
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


def upgrade() -> None:
    p = prefix()
    op.create_table(
        f"{p}_events",
        sa.Column("position", Position, primary_key=True, autoincrement=True),
        *_event_columns(),
        sa.Column("next_attempt_at", Timestamp, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("published_at", Timestamp, nullable=True),
    )
    op.create_index(
        f"ix_{p}_events_pending",
        f"{p}_events",
        ["shard", "position"],
        postgresql_where=sa.text("published_at IS NULL"),
        sqlite_where=sa.text("published_at IS NULL"),
    )
    op.create_index(
        f"ix_{p}_events_published",
        f"{p}_events",
        ["position"],
        postgresql_where=sa.text("published_at IS NOT NULL"),
        sqlite_where=sa.text("published_at IS NOT NULL"),
    )
    op.create_table(
        f"{p}_dead_letters",
        sa.Column("position", Position, primary_key=True, autoincrement=False),
        *_event_columns(),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("failed_at", Timestamp, nullable=False),
    )
    op.create_index(f"ix_{p}_dead_letters_event_id", f"{p}_dead_letters", ["event_id"])
    op.create_table(
        f"{p}_shards",
        sa.Column("shard", sa.SmallInteger(), primary_key=True, autoincrement=False),
        sa.Column("relay_waiting", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.Column("owner_since", Timestamp, nullable=True),
    )
    op.create_table(
        f"{p}_inbox",
        sa.Column("consumer_group", sa.Text(), primary_key=True),
        sa.Column("event_id", sa.Uuid(), primary_key=True),
        sa.Column("processed_at", Timestamp, nullable=False),
    )
    op.create_index(f"ix_{p}_inbox_processed_at", f"{p}_inbox", ["processed_at"])


def downgrade() -> None:
    p = prefix()
    op.drop_table(f"{p}_inbox")
    op.drop_table(f"{p}_shards")
    op.drop_table(f"{p}_dead_letters")
    op.drop_table(f"{p}_events")
