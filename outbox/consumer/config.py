"""The consumer's settings, in one object (as the relay's are in RelayConfig).

`outbox consume` fills it from its flags, each of which also reads an OUTBOX_* variable
(the table in docs/configuration.md; unit tests check that every flag has one and is
there). In Python, `ConsumerRunner(consumer, db_url=..., kafka=...)` takes the same
fields as keywords.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from outbox.consumer.source import CLIENTS
from outbox.errors import ConfigError
from outbox.publisher import KafkaSettings, Publisher, make_publisher
from outbox.schema import DEFAULT_PREFIX, validate_prefix

#: The dead-letter producer's request limit, far above Kafka's default message size
#: (1 MiB): a copy is the record plus the outbox_* headers, so it must be allowed to be
#: larger than any record its topic accepted. The dead-letter topic's own limit decides;
#: a copy the broker refuses is sent truncated (outbox.consumer.deadletter).
DLQ_MAX_REQUEST_BYTES = 64 * 1024 * 1024


@dataclass
class ConsumerConfig:
    """How a ConsumerRunner runs. The comment after each field names its flag."""

    kafka: str = ""                          # --kafka: bootstrap servers
    db_url: str | None = None                # --db
    table_prefix: str = DEFAULT_PREFIX       # --table-prefix
    group_id: str | None = None              # --group-id (default: the consumer's own)
    client: str = "kafka-python"             # --client: kafka-python or confluent
    group_instance_id: str | None = None     # --group-instance-id: static membership
    max_poll_records: int = 500              # --max-poll-records: records per transaction
    session_timeout_ms: int | None = None    # --session-timeout-ms
    kafka_config: Mapping[str, Any] = field(default_factory=dict)  # --kafka-option
    handler_timeout: float | None = 300.0    # --handler-timeout (None: unbounded)
    idle_tx_timeout: float | None = 60.0     # --idle-tx-timeout
    shutdown_grace: float = 10.0             # --shutdown-grace
    # Python-only: the loop's pace and housekeeping.
    poll_timeout: float = 0.5
    client_id: str | None = None
    purge_interval: float = 60.0
    purge_batch: int = 1000
    lag_interval: float = 10.0
    dlq_timeout: float = 30.0
    commit_timeout: float = 10.0
    hang_report_interval: float = 10.0

    def __post_init__(self) -> None:
        self.kafka_config = dict(self.kafka_config or {})

    @classmethod
    def of(cls, **settings: Any) -> ConsumerConfig:
        """A config from keywords, refusing unknown ones by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown consumer setting(s) {unknown}; known: {sorted(known)}")
        return cls(**settings)

    def validate(self) -> None:
        """Refuse settings that cannot work, naming them."""
        validate_prefix(self.table_prefix)
        if self.client not in CLIENTS:
            raise ConfigError(f"unknown Kafka client {self.client!r}; choose one of "
                              f"{', '.join(CLIENTS)}")
        if not isinstance(self.max_poll_records, int) or self.max_poll_records < 1:
            raise ConfigError("max_poll_records must be >= 1")
        if not self.shutdown_grace > 0 or not self.hang_report_interval > 0:
            raise ConfigError("shutdown_grace and hang_report_interval must be > 0 seconds")
        for name in ("handler_timeout", "idle_tx_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0 seconds (or None)")
        if self.group_instance_id is not None and (
                not isinstance(self.group_instance_id, str) or not self.group_instance_id
                or self.group_instance_id in (".", "..")):
            raise ConfigError(f"group_instance_id must be a non-empty name, got "
                              f"{self.group_instance_id!r}")
        auto = self.kafka_config.get("enable_auto_commit",
                                     self.kafka_config.get("enable.auto.commit"))
        if auto not in (None, False) and str(auto).lower() not in ("false", "0"):
            raise ConfigError("enable_auto_commit cannot be turned on: offsets are committed "
                              "after the database commit")

    def name_client(self) -> str:
        """The client id the Kafka clients announce (host and a random suffix)."""
        if not self.client_id:
            self.client_id = f"outbox-consumer-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        return self.client_id


def open_source(config: ConsumerConfig, group_id: str) -> Any:
    """A RecordSource for `config.client` (not subscribed yet)."""
    if config.client == "confluent":
        from outbox.consumer.confluent_source import ConfluentSource

        return ConfluentSource(config, group_id)
    from outbox.consumer.kafka_source import KafkaPythonSource

    return KafkaPythonSource(config, group_id)


def dead_letter_settings(config: ConsumerConfig) -> KafkaSettings:
    """The dead-letter producer's settings, as the relay's (idempotent, acks=all, checked
    by the publisher), with no linger and a request limit large enough for any copy (the
    dead-letter topic's own limit decides). Of the consumer's --kafka-option settings only
    the security ones (security/sasl/ssl) reach the producer: the rest are consumer
    settings."""
    timeout_ms = int(config.dlq_timeout * 1000)
    if config.client == "confluent":
        prefixes: tuple[str, ...] = ("security.", "sasl.", "ssl.")
        extra: dict[str, Any] = {"logger": logging.getLogger("kafka.librdkafka")}
    else:
        prefixes = ("security_", "sasl_", "ssl_")
        extra = {"bootstrap_timeout_ms": 5000}
    extra.update((k, v) for k, v in config.kafka_config.items() if k.startswith(prefixes))
    return KafkaSettings(
        config.kafka, linger_ms=0, max_request_size=DLQ_MAX_REQUEST_BYTES,
        request_timeout_ms=min(30_000, timeout_ms), delivery_timeout_ms=max(timeout_ms, 1000),
        client_id=f"{config.name_client()}-dlq", max_block_ms=timeout_ms, extra=extra)


def dead_letter_publisher(config: ConsumerConfig) -> Publisher:
    """The Publisher dead-letter copies go through: the relay's own (`make_publisher`) on
    the same client as the source, so it fails stop and recovers as the relay's does."""
    return make_publisher(config.client, dead_letter_settings(config))
