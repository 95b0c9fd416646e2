"""The `outbox` command. Every flag also reads an OUTBOX_* environment variable."""

from __future__ import annotations

import logging
import sys

import click

from outbox.dburl import mask
from outbox.schema import DEFAULT_PREFIX

db_option = click.option(
    "--db", "db_url", envvar="OUTBOX_DATABASE_URL", required=True, show_envvar=True,
    help="Database URL, e.g. postgresql://user:pass@host/db",
)
prefix_option = click.option(
    "--table-prefix", envvar="OUTBOX_TABLE_PREFIX", default=DEFAULT_PREFIX, show_default=True,
    show_envvar=True, help="Prefix of the outbox's table names.",
)


@click.group()
@click.option("--log-level", envvar="OUTBOX_LOG_LEVEL", default="INFO", show_envvar=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(log_level: str) -> None:
    """transactional-outbox: relay outbox events to Kafka, consume them once."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.WARNING)


@main.group()
def db() -> None:
    """Create and migrate the outbox's tables."""


@db.command("upgrade")
@db_option
@prefix_option
@click.option("--revision", default="head", show_default=True)
def db_upgrade(db_url: str, table_prefix: str, revision: str) -> None:
    """Create / migrate the outbox tables (own version table: <prefix>_alembic_version)."""
    from outbox import migrate

    try:
        migrate.upgrade(db_url, revision=revision, prefix=table_prefix)
    except Exception as exc:
        raise click.ClickException(f"migration of {mask(db_url)} failed: {_clean(exc, db_url)}")
    click.echo(f"outbox tables at {revision} in {mask(db_url)}")


def _clean(exc: BaseException, url: str) -> str:
    """An error message with any password from the URL masked."""
    from sqlalchemy.engine import make_url

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        password = make_url(url).password
    except Exception:
        password = None
    return text.replace(str(password), "***") if password else text


if __name__ == "__main__":
    sys.exit(main())
