"""`outbox db`, `outbox status` and `outbox dead-letters`: the commands that manage an
outbox's tables."""


from __future__ import annotations

import logging

import click

from outbox import cli as base
from outbox.cli import db_option, main, pg_db_option, prefix_option
from outbox.dburl import mask
from outbox.errors import ConfigError

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
def status(db_url: str, table_prefix: str) -> None:
    """Backlog per shard, oldest pending age, dead letters, live relays and their shards."""
    import psycopg

    from outbox.dburl import libpq_url
    from outbox.schema import make_tables
    from outbox.store import Store

    store = Store(make_tables(table_prefix))
    try:
        with psycopg.connect(libpq_url(db_url), autocommit=True, connect_timeout=5) as conn:
            backlog = store.backlog(conn)
            dead = store.count_dead_letters(conn)
            relays = store.relays(conn)
            count = store.shard_count(conn)
            now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    except psycopg.Error as exc:
        raise click.ClickException(f"cannot read {mask(db_url)}: {base._clean(exc)}") from None
    total = sum(r["pending"] for r in backlog)
    oldest = min((r["oldest"] for r in backlog), default=None)
    age = f"{(now - oldest).total_seconds():.1f}s" if oldest else "-"
    click.echo(f"pending events: {total}   oldest pending: {age}   dead letters: {dead}   "
               f"shards: {count}")
    owned = {shard for r in relays for shard in r["shards"]}
    unowned = []
    for r in backlog:
        flag = ""
        if r["shard"] >= count:
            flag = "   <- OUTSIDE THE SHARD COUNT: no relay will ever take it"
        elif r["shard"] not in owned:
            flag = "   <- NO OWNER"
        if flag:
            unowned.append(r["shard"])
        click.echo(f"  shard {r['shard']:>4}: {r['pending']} pending, "
                   f"oldest {(now - r['oldest']).total_seconds():.1f}s, "
                   f"max attempts {r['max_attempts']}{flag}")
    if unowned:
        click.echo(f"warning: pending events in {len(unowned)} shard(s) no live relay owns: "
                   f"{','.join(map(str, unowned))}")
    click.echo(f"live relays: {len(relays)}")
    for r in relays:
        shards = ",".join(str(s) for s in r["shards"]) or "none"
        click.echo(f"  {r['application_name'] or r['pid']} (pid {r['pid']}, "
                   f"{r['addr'] or 'local'}): shards {shards}")


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
