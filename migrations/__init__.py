"""The outbox's Alembic environment, shipped in the wheel as `outbox.migrations`.

Revisions read the table prefix from `prefix()`, so one history serves any prefix.
"""

from alembic import context

from outbox.schema import DEFAULT_PREFIX, validate_prefix


def prefix() -> str:
    """The table prefix this migration run was started with (see outbox.migrate)."""
    return validate_prefix(context.config.attributes.get("outbox_prefix", DEFAULT_PREFIX))
