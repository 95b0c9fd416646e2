"""`outbox relay`: its options, the checks made before it starts, and the run."""


from __future__ import annotations

import logging
from typing import Any

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
@click.option("--reclaim-above-mb", envvar="OUTBOX_RECLAIM_ABOVE_MB", default=16.0,
              show_default=True, type=click.FloatRange(0, None), show_envvar=True,
              help="Truncate the events table once it is drained, vacuumed and larger "
                   "than this (0: never); needs TRUNCATE on it.")
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
@click.option("--exactly-once", envvar="OUTBOX_EXACTLY_ONCE", is_flag=True, default=False,
              show_envvar=True,
              help="Send in Kafka transactions, fenced per shard: read_committed consumers "
                   "see each event once. Needs transactions on the broker.")
@click.option("--transaction-namespace", "txn_namespace", envvar="OUTBOX_TRANSACTION_NAMESPACE",
              default=None, show_envvar=True,
              help="With --exactly-once: names the Kafka transactional ids "
                   "(outbox-NAME-shard-N) and the progress topic (outbox-NAME-progress); "
                   "unique per outbox on a Kafka cluster. Default: DATABASE.PREFIX.")
@gc_option
def relay(db_url: str, kafka: str, table_prefix: str, num_shards: int | None, batch_size: int,
          poll_interval: float, lease_seconds: float, max_attempts: int,
          retention_seconds: float | None, reclaim_above_mb: float, linger_ms: int,
          kafka_batch_bytes: int,
          delivery_timeout_ms: int, compression: str | None, metrics_port: int | None,
          metrics_host: str, relay_id: str | None, client: str,
          kafka_options: tuple[str, ...], exactly_once: bool,
          txn_namespace: str | None, gc_tuning: bool) -> None:
    """Run a relay worker: publish the outbox to Kafka until SIGTERM."""
    from outbox.metrics import RelayMetrics
    from outbox.publisher import KafkaSettings, make_publisher, parse_options
    from outbox.relay import Relay, RelayConfig

    _check_relay_settings(poll_interval, lease_seconds, linger_ms, delivery_timeout_ms,
                          kafka_batch_bytes, exactly_once)
    try:
        extra = parse_options(kafka_options, client)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if client == "confluent":
        base._check_confluent()
    else:
        _check_compression(compression)
    registry = base._metrics_registry(metrics_port)
    base._preflight(db_url, table_prefix, "relay")

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
        reclaim_above_mb=reclaim_above_mb,
        send_timeout=delivery_timeout_ms / 1000 + 10, exactly_once=exactly_once,
        txn_namespace=txn_namespace,
    )
    kit: dict[str, Any] = {}
    if exactly_once:
        from outbox.exactly_once import namespace
        from outbox.progress import KafkaProgressLog, progress_topic
        from outbox.txn import make_txn_producer

        timeout_ms = int(lease_seconds * 1000)
        name = txn_namespace or namespace(db_url, table_prefix)
        kit = {"transactions": lambda tid: make_txn_producer(client, settings, tid, timeout_ms),
               "progress": KafkaProgressLog(settings, progress_topic(name))}
    worker = Relay(config, lambda: make_publisher(client, settings), RelayMetrics(registry),
                   **kit)
    if metrics_port:
        base._serve_metrics(metrics_port, metrics_host, registry, worker.healthy)
    worker.install_signal_handlers()
    if gc_tuning:
        gctune.tune()
    try:
        worker.run()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _check_relay_settings(poll_interval: float, lease_seconds: float, linger_ms: int,
                          delivery_timeout_ms: int, kafka_batch_bytes: int,
                          exactly_once: bool = False) -> None:
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
    if exactly_once and linger_ms >= lease_seconds * 1000:
        raise click.UsageError(
            f"--linger-ms ({linger_ms}) must be shorter than --lease ({lease_seconds:g} s) "
            "with --exactly-once: a transaction times out after the lease, and a send "
            "lingers before it is even sent")
    max_request = KafkaSettings("").max_request_size
    if kafka_batch_bytes > max_request:
        raise click.UsageError(
            f"--kafka-batch-bytes ({kafka_batch_bytes}) must not exceed the producer's "
            f"largest request ({max_request} bytes)")


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
