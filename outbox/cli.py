"""The `outbox` command. Every option also reads an OUTBOX_* environment variable.

A condition the user can cause (a bad URL or setting, an unmigrated database, a wrong
password, a missing library, a port in use) ends the command with one clear line and a
non-zero exit, never a Python traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from outbox.dburl import mask
from outbox.errors import ConfigError
from outbox.schema import DEFAULT_PREFIX

log = logging.getLogger("outbox.cli")


def _checked_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a URL that does not parse cleanly before anything connects (see dburl.parse)."""
    from outbox.dburl import parse

    if value is not None:
        try:
            parse(value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _postgresql_url(ctx: click.Context, param: click.Parameter,
                    value: str | None) -> str | None:
    """As _checked_url, for the commands that need PostgreSQL (not SQLite)."""
    from outbox.dburl import require_postgresql

    if value is not None:
        command = " ".join(c.info_name or "" for c in _lineage(ctx)[1:])
        try:
            require_postgresql(value, f"`outbox {command}`")
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _lineage(ctx: click.Context) -> list[click.Context]:
    chain = [ctx]
    while chain[0].parent is not None:
        chain.insert(0, chain[0].parent)
    return chain


def _checked_prefix(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from outbox.schema import validate_prefix

    try:
        return validate_prefix(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


db_option = click.option(
    "--db", "db_url", envvar="OUTBOX_DATABASE_URL", required=True, show_envvar=True,
    callback=_checked_url,
    help="Database URL, e.g. postgresql://user:pass@host/db (percent-encode '@', ':', '/' "
         "and '%' in the password).",
)
pg_db_option = click.option(
    "--db", "db_url", envvar="OUTBOX_DATABASE_URL", required=True, show_envvar=True,
    callback=_postgresql_url,
    help="PostgreSQL URL, e.g. postgresql://user:pass@host/db (percent-encode '@', ':', '/' "
         "and '%' in the password).",
)
prefix_option = click.option(
    "--table-prefix", envvar="OUTBOX_TABLE_PREFIX", default=DEFAULT_PREFIX, show_default=True,
    show_envvar=True, callback=_checked_prefix, help="Prefix of the outbox's table names.",
)
metrics_host_option = click.option(
    "--metrics-host", envvar="OUTBOX_METRICS_HOST", default="127.0.0.1", show_default=True,
    show_envvar=True,
    help="Address the metrics endpoint binds (it has no authentication; 0.0.0.0 for every "
         "interface).",
)


class _Main(click.Group):
    """The root group: an OutboxError a command lets through still ends in one line."""

    def invoke(self, ctx: click.Context) -> Any:
        from outbox.dburl import mask_text

        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise click.ClickException(mask_text(str(exc))) from None


@click.group(cls=_Main)
@click.option("--log-level", envvar="OUTBOX_LOG_LEVEL", default="INFO", show_envvar=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(log_level: str) -> None:
    """transactional-outbox: relay outbox events to Kafka, consume them once."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(KafkaClientLogLimit())


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
    from outbox.errors import ConfigError

    try:
        migrate.upgrade(db_url, revision=revision, prefix=table_prefix, shards=num_shards)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(
            f"migration of {mask(db_url)} failed: {_clean(exc)}") from None
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
    from outbox.errors import ConfigError
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
            f"{_clean(getattr(exc, 'orig', None) or exc)}") from None
    finally:
        engine.dispose()
    click.echo(f"shard count {before} -> {count}")


kafka_option = click.option(
    "--kafka", "kafka", envvar="OUTBOX_KAFKA_BOOTSTRAP_SERVERS", required=True,
    show_envvar=True, help="Kafka bootstrap servers, HOST:PORT[,HOST:PORT...]",
)


@main.command()
@pg_db_option
@kafka_option
@prefix_option
@click.option("--shards", "num_shards", envvar="OUTBOX_SHARDS", default=None,
              type=click.IntRange(1, 1024), show_envvar=True,
              help="Expected shard count; the relay refuses to start if the database's "
                   "(set by `outbox db upgrade --shards`) differs. Default: the database's.")
@click.option("--batch-size", envvar="OUTBOX_BATCH_SIZE", default=2000, show_default=True,
              type=click.IntRange(1, 100_000), show_envvar=True)
@click.option("--poll-interval", envvar="OUTBOX_POLL_INTERVAL", default=1.0, show_default=True,
              type=click.FloatRange(0.01, 60), show_envvar=True,
              help="Seconds between polls when no NOTIFY arrives.")
@click.option("--lease", "lease_seconds", envvar="OUTBOX_LEASE_SECONDS", default=10.0,
              show_default=True, type=click.FloatRange(1, 3600), show_envvar=True,
              help="A relay silent this long loses its shards (idle_session_timeout).")
@click.option("--max-attempts", envvar="OUTBOX_MAX_ATTEMPTS", default=12, show_default=True,
              type=click.IntRange(1, 1000), show_envvar=True,
              help="Failed sends of one event before it is dead-lettered.")
@click.option("--retention", "retention_seconds", envvar="OUTBOX_RETENTION_SECONDS",
              default=None, type=click.FloatRange(0, None), show_envvar=True,
              help="Keep published events this many seconds (default: delete at once).")
@click.option("--linger-ms", envvar="OUTBOX_LINGER_MS", default=5, show_default=True,
              type=click.IntRange(0, 60_000), show_envvar=True)
@click.option("--kafka-batch-bytes", envvar="OUTBOX_KAFKA_BATCH_BYTES", default=256 * 1024,
              show_default=True, type=click.IntRange(1024, 64 * 1024 * 1024), show_envvar=True)
@click.option("--delivery-timeout-ms", envvar="OUTBOX_DELIVERY_TIMEOUT_MS", default=120_000,
              show_default=True, type=click.IntRange(1000, 3_600_000), show_envvar=True,
              help="How long the producer retries a send before the relay sees it fail "
                   "(then the relay retries the shard with backoff).")
@click.option("--compression", envvar="OUTBOX_COMPRESSION", default=None, show_envvar=True,
              type=click.Choice(["gzip", "snappy", "lz4", "zstd"]))
@click.option("--metrics-port", envvar="OUTBOX_METRICS_PORT", default=None, show_envvar=True,
              type=click.IntRange(1, 65535), help="Serve /metrics and /healthz on this port.")
@metrics_host_option
@click.option("--relay-id", envvar="OUTBOX_RELAY_ID", default=None, show_envvar=True)
@click.option("--client", envvar="OUTBOX_KAFKA_CLIENT", default="kafka-python",
              show_default=True, show_envvar=True,
              type=click.Choice(["kafka-python", "confluent"]),
              help="Kafka client: kafka-python (pure Python), or confluent (librdkafka, the "
                   "[confluent] extra; many times the throughput).")
@click.option("--kafka-option", "kafka_options", envvar="OUTBOX_KAFKA_OPTIONS", multiple=True,
              show_envvar=True, metavar="KEY=VALUE",
              help="A producer setting passed to the client as it spells it (repeatable; "
                   "e.g. security.protocol=SASL_SSL for confluent, security_protocol=SASL_SSL "
                   "for kafka-python). Idempotence and acks=all cannot be turned off.")
def relay(db_url: str, kafka: str, table_prefix: str, num_shards: int | None, batch_size: int,
          poll_interval: float, lease_seconds: float, max_attempts: int,
          retention_seconds: float | None, linger_ms: int, kafka_batch_bytes: int,
          delivery_timeout_ms: int, compression: str | None, metrics_port: int | None,
          metrics_host: str, relay_id: str | None, client: str,
          kafka_options: tuple[str, ...]) -> None:
    """Run a relay worker: publish the outbox to Kafka until SIGTERM."""
    from outbox.metrics import RelayMetrics
    from outbox.publisher import KafkaSettings, make_publisher, parse_options
    from outbox.relay import Relay, RelayConfig

    _check_relay_settings(poll_interval, lease_seconds, linger_ms, delivery_timeout_ms,
                          kafka_batch_bytes)
    try:
        extra = parse_options(kafka_options, client)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if client == "confluent":
        _check_confluent()
    else:
        _check_compression(compression)
    registry = _metrics_registry(metrics_port)
    _preflight(db_url, table_prefix, "relay")

    settings = KafkaSettings(
        kafka, linger_ms=linger_ms, batch_size=kafka_batch_bytes, compression_type=compression,
        delivery_timeout_ms=delivery_timeout_ms,
        request_timeout_ms=min(30_000, delivery_timeout_ms - linger_ms),
        # A send blocked on a topic's metadata must not outlast the relay's lease.
        max_block_ms=int(min(5.0, lease_seconds / 2) * 1000), extra=extra,
    )
    config = RelayConfig(
        db_url=db_url, table_prefix=table_prefix, num_shards=num_shards,
        batch_size=batch_size, poll_interval=poll_interval, lease_seconds=lease_seconds,
        max_attempts=max_attempts, retention_seconds=retention_seconds, relay_id=relay_id,
        send_timeout=delivery_timeout_ms / 1000 + 10,
    )
    worker = Relay(config, lambda: make_publisher(client, settings), RelayMetrics(registry))
    if metrics_port:
        _serve_metrics(metrics_port, metrics_host, registry, worker.healthy)
    worker.install_signal_handlers()
    from outbox.errors import ConfigError

    try:
        worker.run()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


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
        raise click.ClickException(f"cannot read {mask(db_url)}: {_clean(exc)}") from None
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
            f"cannot read the dead letters in {mask(db_url)}: {_clean(exc)}") from None
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
                                   f"{mask(db_url)}: {_clean(exc)}") from None
    click.echo(f"{'retried' if retry else 'purged'} {n} dead letter(s)")


class KafkaClientLogLimit(logging.Filter):
    """kafka-python logs every reconnect attempt while a broker is down; let one line per
    logger and level through every `interval` seconds (ours are throttled already)."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, int], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("kafka"):
            return True
        import time

        key, now = (record.name, record.levelno), time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            return False
        self._last[key] = now
        return True


def _clean(exc: BaseException) -> str:
    """One line about `exc` for the user: what cannot heal by waiting named as such.

    URLs and DSN passwords in it are masked by parsing them, never by searching for the
    password's text (that garbles messages and gives short passwords away).
    """
    from outbox.dburl import mask_text
    from outbox.diagnose import permanent_reason

    text = str(exc).strip()
    return mask_text(permanent_reason(exc) or (text.splitlines()[0] if text
                                               else type(exc).__name__))


@main.command()
@click.argument("target", envvar="OUTBOX_CONSUMER")
@pg_db_option
@kafka_option
@prefix_option
@click.option("--group-id", envvar="OUTBOX_GROUP_ID", default=None, show_envvar=True,
              help="Consumer group (default: the consumer's own group_id).")
@click.option("--max-poll-records", envvar="OUTBOX_MAX_POLL_RECORDS", default=500,
              show_default=True, type=click.IntRange(1, 100_000), show_envvar=True,
              help="Records per poll batch, i.e. per database transaction.")
@click.option("--session-timeout-ms", envvar="OUTBOX_KAFKA_SESSION_TIMEOUT_MS", default=None,
              type=click.IntRange(1000, 3_600_000), show_envvar=True,
              help="Kafka group session timeout: how soon a dead consumer's partitions move "
                   "(kafka-python's default: 45000).")
@click.option("--client", envvar="OUTBOX_KAFKA_CLIENT", default="kafka-python",
              show_default=True, show_envvar=True,
              type=click.Choice(["kafka-python", "confluent"]),
              help="Kafka client: kafka-python, or confluent (librdkafka, the [confluent] "
                   "extra: the fast one).")
@click.option("--kafka-option", "kafka_options", envvar="OUTBOX_KAFKA_OPTIONS", multiple=True,
              show_envvar=True, metavar="KEY=VALUE",
              help="A Kafka client setting in the client's own spelling (repeatable; the "
                   "variable takes several, space-separated), e.g. security.protocol=SSL.")
@click.option("--group-instance-id", envvar="OUTBOX_GROUP_INSTANCE_ID", default=None,
              show_envvar=True,
              help="Static group membership (group.instance.id, unique per process): a "
                   "restarted consumer takes its partitions back without a rebalance.")
@click.option("--handler-timeout", envvar="OUTBOX_HANDLER_TIMEOUT", default=300.0,
              show_default=True, type=click.FloatRange(0, None), show_envvar=True,
              help="Seconds a handler call may run: longer counts as a failed attempt and "
                   "restarts the process (0: no limit).")
@click.option("--idle-tx-timeout", envvar="OUTBOX_IDLE_TX_TIMEOUT", default=60.0,
              show_default=True, type=click.FloatRange(0, None), show_envvar=True,
              help="The database ends a batch's transaction left idle this long (0: never).")
@click.option("--shutdown-grace", envvar="OUTBOX_SHUTDOWN_GRACE", default=10.0,
              show_default=True, type=click.FloatRange(0.1, None), show_envvar=True,
              help="Seconds after SIGTERM before a consumer that has not stopped exits.")
@click.option("--metrics-port", envvar="OUTBOX_METRICS_PORT", default=None, show_envvar=True,
              type=click.IntRange(1, 65535), help="Serve /metrics and /healthz on this port.")
@metrics_host_option
def consume(target: str, db_url: str, kafka: str, table_prefix: str, group_id: str | None,
            max_poll_records: int, session_timeout_ms: int | None, client: str,
            kafka_options: tuple[str, ...], group_instance_id: str | None,
            handler_timeout: float, idle_tx_timeout: float, shutdown_grace: float,
            metrics_port: int | None, metrics_host: str) -> None:
    """Run an idempotent consumer, TARGET = package.module:ClassName, until SIGTERM.

    TARGET is an IdempotentConsumer subclass or a function decorated with @consumer(...);
    the current directory is importable.
    """
    import os

    from outbox.consumer import ConsumerRunner, load_consumer
    from outbox.dburl import parse
    from outbox.metrics import ConsumerMetrics

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    # The consumer runs on psycopg 3, whichever driver the URL names.
    psycopg_url = parse(db_url).set(drivername="postgresql+psycopg").render_as_string(
        hide_password=False)
    from outbox.publisher import parse_options

    try:
        options = parse_options(kafka_options, client)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if client == "confluent":
        _check_confluent()
    try:
        handler = load_consumer(target)
        registry = _metrics_registry(metrics_port)
        runner = ConsumerRunner(
            handler, db_url=psycopg_url, kafka=kafka, table_prefix=table_prefix,
            group_id=group_id, max_poll_records=max_poll_records,
            session_timeout_ms=session_timeout_ms, client=client, kafka_config=options,
            group_instance_id=group_instance_id, handler_timeout=handler_timeout or None,
            idle_tx_timeout=idle_tx_timeout or None, shutdown_grace=shutdown_grace,
            metrics=ConsumerMetrics(registry),
        )
    except ConfigError as exc:
        raise click.ClickException(_clean(exc)) from None
    _preflight(db_url, table_prefix, "consumer")
    if metrics_port:
        _serve_metrics(metrics_port, metrics_host, registry, runner.healthy)
    runner.install_signal_handlers()
    from outbox.errors import OutboxError

    try:
        runner.run()
    except OutboxError as exc:  # found while running: a misconfiguration, a handler misuse
        raise click.ClickException(_clean(exc)) from None


def _check_relay_settings(poll_interval: float, lease_seconds: float, linger_ms: int,
                          delivery_timeout_ms: int, kafka_batch_bytes: int) -> None:
    """Refuse settings that contradict each other, before anything starts."""
    from outbox.publisher import KafkaSettings

    if poll_interval >= lease_seconds:
        raise click.UsageError(
            f"--poll-interval ({poll_interval:g} s) must be shorter than --lease "
            f"({lease_seconds:g} s): a relay silent for its lease loses its shards")
    if delivery_timeout_ms < linger_ms + 1000:
        raise click.UsageError(
            f"--delivery-timeout-ms ({delivery_timeout_ms}) must exceed --linger-ms "
            f"({linger_ms}) by at least 1000: a send lingers first, then needs time for "
            "its request")
    max_request = KafkaSettings("").max_request_size
    if kafka_batch_bytes > max_request:
        raise click.UsageError(
            f"--kafka-batch-bytes ({kafka_batch_bytes}) must not exceed the producer's "
            f"largest request ({max_request} bytes)")


def _check_confluent() -> None:
    """`--client confluent` without the extra installed: say how to get it."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "--client confluent needs the confluent-kafka package: "
            "pip install 'transactional-outbox[confluent]'") from None


def _check_compression(codec: str | None) -> None:
    """A compression library that is not installed never appears by waiting: stop now."""
    if codec is None:
        return
    from kafka import codec as codecs

    from outbox.diagnose import COMPRESSION_PACKAGES

    available = {"gzip": codecs.has_gzip, "snappy": codecs.has_snappy,
                 "lz4": codecs.has_lz4, "zstd": codecs.has_zstd}[codec]
    if not available():
        package = COMPRESSION_PACKAGES.get(codec, codec)
        raise click.ClickException(
            f"--compression {codec} needs the Python package {package!r}, which is not "
            f"installed: pip install {package}, or choose another --compression")


def _metrics_registry(port: int | None) -> Any:
    """A Prometheus registry when a metrics port is asked for (None otherwise)."""
    if not port:
        return None
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise click.ClickException(
            "--metrics-port needs prometheus-client, which is not installed: "
            "pip install 'transactional-outbox[metrics]'") from None
    return CollectorRegistry()


def _serve_metrics(port: int, host: str, registry: Any, healthy: Any) -> None:
    from outbox.metrics import serve

    try:
        serve(port, registry, healthy, host=host)
    except OSError as exc:  # port in use, no permission, unknown address
        raise click.ClickException(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None


def _preflight(db_url: str, table_prefix: str, what: str) -> None:
    """Connect once before the service loop: stop with the reason on what waiting cannot
    fix (authentication, a missing database or tables); a server that does not answer
    may be starting, so that is logged and left to the loop's backoff."""
    import psycopg

    from outbox.dburl import libpq_url
    from outbox.diagnose import permanent_reason
    from outbox.schema import make_tables

    tables = make_tables(table_prefix)
    needed = [tables.inbox, tables.attempts] if what == "consumer" else [
        tables.events, tables.dead_letters, tables.shards]
    try:
        with psycopg.connect(libpq_url(db_url), autocommit=True, connect_timeout=5) as conn:
            missing = [t.name for t in needed
                       if conn.execute("SELECT to_regclass(%s)", (t.name,)).fetchone()
                       == (None,)]
    except psycopg.Error as exc:
        reason = permanent_reason(exc)
        if reason:
            raise click.ClickException(
                f"{what} cannot start on {mask(db_url)}: {_clean(exc)}") from None
        log.warning("%s: database %s unreachable at startup (%s); it may still be "
                    "starting: retrying with backoff", what, mask(db_url), _clean(exc))
        return
    if missing:
        raise click.ClickException(
            f"{what} cannot start on {mask(db_url)}: the outbox tables are missing "
            f"({', '.join(missing)}): run `outbox db upgrade` on this database, with the same "
            "--table-prefix")


if __name__ == "__main__":
    sys.exit(main())
