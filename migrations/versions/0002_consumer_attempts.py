"""The consumers' attempts per event: `max_attempts` counts across restarts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op
from outbox.migrations import prefix

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    p = prefix()
    op.create_table(
        f"{p}_attempts",
        sa.Column("consumer_group", sa.Text(), primary_key=True),
        sa.Column("event_id", sa.Uuid(), primary_key=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(f"ix_{p}_attempts_updated_at", f"{p}_attempts", ["updated_at"])


def downgrade() -> None:
    op.drop_table(f"{prefix()}_attempts")
