"""`outbox db`, `outbox status` and `outbox dead-letters`: the commands that manage an
outbox's tables."""


from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from outbox import cli as base
from outbox.cli import db_option, main, pg_db_option, prefix_option
from outbox.dburl import mask
from outbox.errors import ConfigError

if TYPE_CHECKING:
    from outbox.status import Status

log = logging.getLogger("outbox.cli")


@main.group()
def db() -> None:
    """Create and migrate the outbox's tables."""


@db.command("upgrade")
@db_option
@prefix_option
@click.option("--revision", envvar="OUTBOX_REVISION", default="head", show_default=True,
              show_envvar=True)
@click.option("--shards", "num_shards", envvar="OUTBOX_SHARDS", default=None,
              type=click.IntRange(1, 1024), show_envvar=True,
              help="Shard count of a new outbox (default 16); on an existing one it must "
                   "match (change it with `outbox db set-shards`).")
def db_upgrade(db_url: str, table_prefix: str, revision: str, num_shards: int | None) -> None:
    """Create / migrate the outbox tables (own version table: <prefix>_alembic_version)."""
    from outbox import migrate

    try:
        migrate.upgrade(db_url, revision=revision, prefix=table_prefix, shards=num_shards)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(
            f"migration of {mask(db_url)} failed: {base._clean(exc)}") from None
    click.echo(f"outbox tables at {revision} in {mask(db_url)}")


@db.command("set-shards")
@db_option
@prefix_option
@click.argument("count", type=click.IntRange(1, 1024))
def db_set_shards(db_url: str, table_prefix: str, count: int) -> None:
    """Change the shard count: only with every relay stopped and no pending event."""
    import sqlalchemy as sa

    from outbox import shardcount
    from outbox.dburl import sqlalchemy_url
    from outbox.schema import make_tables

    engine = sa.create_engine(sqlalchemy_url(db_url), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            before = shardcount.change(conn, make_tables(table_prefix), count)
    except ConfigError as exc:
        raise click.ClickException(f"shard count not changed: {exc}") from None
    except sa.exc.SQLAlchemyError as exc:
        raise click.ClickException(
            f"cannot change the shard count in {mask(db_url)}: "
            f"{base._clean(getattr(exc, 'orig', None) or exc)}") from None
    finally:
        engine.dispose()
    click.echo(f"shard count {before} -> {count}")


@main.command()
@pg_db_option
@prefix_option
@click.option("--json", "as_json", is_flag=True, envvar="OUTBOX_STATUS_JSON", show_envvar=True,
              help="Print one JSON document for scripts (its schema: outbox/status.py).")
@click.option("--watch", is_flag=True, envvar="OUTBOX_STATUS_WATCH", show_envvar=True,
              help="A live view, redrawn every --interval seconds until Ctrl-C (needs rich: "
                   "the [status] extra).")
@click.option("--interval", envvar="OUTBOX_STATUS_INTERVAL", default=2.0, show_default=True,
              type=click.FloatRange(0.5, 3600), show_envvar=True,
              help="Seconds between two frames of --watch.")
@click.option("--group", "groups", multiple=True, envvar="OUTBOX_STATUS_GROUPS",
              show_envvar=True, metavar="NAME",
              help="A consumer group to report on (repeatable; the variable takes several, "
                   "space-separated); groups with events in retry are always reported.")
@click.option("--kafka", envvar="OUTBOX_KAFKA_BOOTSTRAP_SERVERS", default=None,
              show_envvar=True,
              help="Kafka bootstrap servers, for the groups' lag, held partitions and "
                   "dead-letter counts.")
@click.option("--dlq-suffix", envvar="OUTBOX_DLQ_SUFFIX", default=".dlq", show_default=True,
              show_envvar=True, help="The groups' dead-letter topics are <topic><suffix>.")
def status(db_url: str, table_prefix: str, as_json: bool, watch: bool, interval: float,
           groups: tuple[str, ...], kafka: str | None, dlq_suffix: str) -> None:
    """Backlog per shard, oldest pending age, dead letters, live relays and their shards,
    and consumer groups (lag, held partitions, dead letters: with --kafka).

    Exits 1 when something could not be read (the database; Kafka, after the report)."""
    import json

    import psycopg

    from outbox.dburl import libpq_url
    from outbox.schema import make_tables
    from outbox.status import PostgresOutbox, gather, text_lines
    from outbox.status import as_json as json_document
    from outbox.store import Store

    if as_json and watch:
        raise click.UsageError("--json and --watch do not go together")
    if groups and not kafka:
        raise click.UsageError("--group needs --kafka (or OUTBOX_KAFKA_BOOTSTRAP_SERVERS) "
                               "to read the group's offsets")
    if watch:
        from outbox.status_view import require_rich

        try:
            require_rich()
        except ImportError as exc:
            raise click.ClickException(str(exc)) from None
    outbox = PostgresOutbox(lambda: psycopg.connect(libpq_url(db_url), autocommit=True,
                                                    connect_timeout=5),
                            Store(make_tables(table_prefix)))
    lag = None
    if kafka:
        from outbox.kafka_lag import KafkaGroupOffsets

        lag = KafkaGroupOffsets(kafka)

    def sample() -> Status:
        try:
            return gather(outbox, lag, groups, dlq_suffix)
        except psycopg.Error as exc:
            outbox.close()
            raise click.ClickException(
                f"cannot read {mask(db_url)}: {base._clean(exc)}") from None

    try:
        if watch:
            _watch(sample, interval)
            return
        found = sample()
    finally:
        outbox.close()
        if lag is not None:
            lag.close()
    if as_json:
        click.echo(json.dumps(json_document(found), indent=2))
    else:
        for line in text_lines(found):
            click.echo(line)
    if found.errors:
        raise click.ClickException("; ".join(found.errors))


def _watch(sample: Callable[[], Status], interval: float) -> None:
    """--watch: a failed sample after the first is shown in the view, not fatal."""
    from outbox.status_view import StatusUnavailable, watch

    first = [True]

    def take() -> Status:
        try:
            got = sample()
        except click.ClickException as exc:
            if first[0]:
                raise
            raise StatusUnavailable(exc.message) from None
        first[0] = False
        return got

    watch(take, interval)


@main.group("dead-letters")
def dead_letters() -> None:
    """List, retry or purge events the relay could not publish."""


@dead_letters.command("list")
@pg_db_option
@prefix_option
@click.option("--limit", envvar="OUTBOX_DEAD_LETTERS_LIMIT", default=100, show_default=True,
              show_envvar=True, type=click.IntRange(1, 100_000))
def dead_letters_list(db_url: str, table_prefix: str, limit: int) -> None:
    """Show dead-lettered events with their errors."""
    import psycopg

    from outbox.dburl import libpq_url
    from outbox.schema import make_tables
    from outbox.store import Store

    store = Store(make_tables(table_prefix))
    try:
        with psycopg.connect(libpq_url(db_url), autocommit=True, connect_timeout=5) as conn:
            rows = store.dead_letters(conn, limit)
    except psycopg.Error as exc:
        raise click.ClickException(
            f"cannot read the dead letters in {mask(db_url)}: {base._clean(exc)}") from None
    if not rows:
        click.echo("no dead letters")
    for r in rows:
        click.echo(f"{r['position']}  {r['event_id']}  {r['topic']}  key={r['key']!r}  "
                   f"{r['type']}  attempts={r['attempts']}  {r['failed_at']:%Y-%m-%d %H:%M:%S}"
                   f"\n    {r['error']}")


@dead_letters.command("retry")
@pg_db_option
@prefix_option
@click.argument("positions", nargs=-1, type=int)
@click.option("--all", "everything", is_flag=True, envvar="OUTBOX_DEAD_LETTERS_RETRY_ALL",
              show_envvar=True, help="Retry every dead letter.")
def dead_letters_retry(db_url: str, table_prefix: str, positions: tuple[int, ...],
                       everything: bool) -> None:
    """Put dead letters back in the outbox (at its end) for the relay to publish again."""
    _dead_letter_action(db_url, table_prefix, positions, everything, retry=True)


@dead_letters.command("purge")
@pg_db_option
@prefix_option
@click.argument("positions", nargs=-1, type=int)
@click.option("--all", "everything", is_flag=True, envvar="OUTBOX_DEAD_LETTERS_PURGE_ALL",
              show_envvar=True, help="Purge every dead letter.")
def dead_letters_purge(db_url: str, table_prefix: str, positions: tuple[int, ...],
                       everything: bool) -> None:
    """Delete dead letters for good."""
    _dead_letter_action(db_url, table_prefix, positions, everything, retry=False)


def _dead_letter_action(db_url: str, table_prefix: str, positions: tuple[int, ...],
                        everything: bool, retry: bool) -> None:
    import psycopg

    from outbox.dburl import libpq_url
    from outbox.schema import make_tables
    from outbox.store import Store

    if not positions and not everything:
        raise click.UsageError("name dead letters by position, or pass --all")
    store = Store(make_tables(table_prefix))
    chosen = None if everything else list(positions)
    try:
        with psycopg.connect(libpq_url(db_url), autocommit=True, connect_timeout=5) as conn:
            if retry:
                n = store.retry_dead_letters(conn, chosen)
            else:
                n = store.purge_dead_letters(conn, chosen)
    except psycopg.Error as exc:
        raise click.ClickException(f"cannot {'retry' if retry else 'purge'} dead letters in "
                                   f"{mask(db_url)}: {base._clean(exc)}") from None
    click.echo(f"{'retried' if retry else 'purged'} {n} dead letter(s)")
