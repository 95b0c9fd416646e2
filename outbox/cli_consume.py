"""`outbox consume`: its options and the run of a consumer class."""


from __future__ import annotations

import logging
import sys

import click

from outbox import cli as base
from outbox import gctune
from outbox.cli import (
    gc_option,
    kafka_option,
    main,
    metrics_host_option,
    pg_db_option,
    prefix_option,
)
from outbox.errors import ConfigError

log = logging.getLogger("outbox.cli")


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
@gc_option
def consume(target: str, db_url: str, kafka: str, table_prefix: str, group_id: str | None,
            max_poll_records: int, session_timeout_ms: int | None, client: str,
            kafka_options: tuple[str, ...], group_instance_id: str | None,
            handler_timeout: float, idle_tx_timeout: float, shutdown_grace: float,
            metrics_port: int | None, metrics_host: str, gc_tuning: bool) -> None:
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
        base._check_confluent()
    try:
        handler = load_consumer(target)
        registry = base._metrics_registry(metrics_port)
        runner = ConsumerRunner(
            handler, db_url=psycopg_url, kafka=kafka, table_prefix=table_prefix,
            group_id=group_id, max_poll_records=max_poll_records,
            session_timeout_ms=session_timeout_ms, client=client, kafka_config=options,
            group_instance_id=group_instance_id, handler_timeout=handler_timeout or None,
            idle_tx_timeout=idle_tx_timeout or None, shutdown_grace=shutdown_grace,
            metrics=ConsumerMetrics(registry),
        )
    except ConfigError as exc:
        raise click.ClickException(base._clean(exc)) from None
    base._preflight(db_url, table_prefix, "consumer")
    if metrics_port:
        base._serve_metrics(metrics_port, metrics_host, registry, runner.healthy)
    runner.install_signal_handlers()
    if gc_tuning:
        gctune.tune()
    from outbox.errors import OutboxError

    try:
        runner.run()
    except OutboxError as exc:  # found while running: a misconfiguration, a handler misuse
        raise click.ClickException(base._clean(exc)) from None
