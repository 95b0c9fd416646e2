"""The confluent-kafka RecordSource (the `[confluent]` extra).

librdkafka fetches and decodes in its own C threads, off the GIL: the fast client.
Select it with `outbox consume --client confluent` (OUTBOX_KAFKA_CLIENT=confluent).
`--kafka-option` settings are librdkafka's dotted names (`security.protocol=SASL_SSL`).
Rebalance callbacks run inside `poll` on the runner's thread. librdkafka reconnects by
itself while Kafka is down; the errors it reports meanwhile (all brokers down, transport
errors) make `poll` raise SourceUnavailable, so the runner backs off and says so once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from outbox.consumer.config import ConsumerConfig
from outbox.consumer.source import (
    Batch,
    CommitFailed,
    CommitRefused,
    RebalanceListener,
    Record,
    SourceRecord,
    SourceUnavailable,
    TopicPartition,
)
from outbox.errors import ConfigError

try:
    from confluent_kafka import Consumer, KafkaError, KafkaException
    from confluent_kafka import TopicPartition as ConfluentTP
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ConfigError("the confluent-kafka client is an optional extra: "
                      "pip install 'transactional-outbox[confluent]'") from exc

log = logging.getLogger("outbox.consumer")
#: librdkafka's own log lines (the CLI lets one per interval through, as for kafka-python).
CLIENT_LOG = logging.getLogger("kafka.librdkafka")

_REFUSED = {KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
            KafkaError.UNKNOWN_MEMBER_ID, KafkaError._ASSIGNMENT_LOST, KafkaError._STATE}
_DOWN = {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE}


def _ctp(tp: TopicPartition, offset: int | None = None) -> Any:
    return ConfluentTP(tp.topic, tp.partition) if offset is None else \
        ConfluentTP(tp.topic, tp.partition, offset)


def _ours(partitions: Sequence[Any]) -> list[TopicPartition]:
    return sorted(TopicPartition(p.topic, p.partition) for p in partitions)


class ConfluentSource:
    """A RecordSource on confluent-kafka's Consumer (`client`, once subscribed)."""

    def __init__(self, config: ConsumerConfig, group_id: str) -> None:
        self.config = config
        self.group_id = group_id
        self.client: Any = None
        self._paused: set[TopicPartition] = set()
        self._error: Any = None  # the last error librdkafka reported (error_cb)
        self._lock = threading.Lock()

    def settings(self) -> dict[str, Any]:
        cfg = self.config
        settings: dict[str, Any] = {
            "bootstrap.servers": cfg.kafka,
            "client.id": cfg.name_client(),
            "auto.offset.reset": "earliest",
            **cfg.kafka_config,
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "error_cb": self._on_error,
            "logger": CLIENT_LOG,
        }
        if cfg.session_timeout_ms is not None:
            settings["session.timeout.ms"] = cfg.session_timeout_ms
            settings.setdefault("heartbeat.interval.ms", max(500, cfg.session_timeout_ms // 4))
        if cfg.group_instance_id is not None:
            settings["group.instance.id"] = cfg.group_instance_id
        return settings

    def _on_error(self, error: Any) -> None:  # librdkafka's thread, or inside poll
        with self._lock:
            self._error = error

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        try:
            client = Consumer(self.settings())
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"confluent-kafka refused the consumer settings: {exc}") from exc

        def assigned(consumer: Any, partitions: list[Any]) -> None:
            listener.assigned(_ours(partitions))

        def revoked(consumer: Any, partitions: list[Any]) -> None:
            tps = _ours(partitions)
            for tp in tps:
                if tp in self._paused:  # a later assignment starts unpaused
                    self._paused.discard(tp)
                    self._call("resume", [_ctp(tp)])
            if tps:
                listener.revoked(tps)

        client.subscribe(list(topics), on_assign=assigned, on_revoke=revoked,
                         on_lost=revoked)
        self.client = client

    def poll(self, timeout: float, max_records: int) -> Batch:
        # consume() waits for a full batch or the timeout: take what is there, else
        # wait for the first message only, then what came with it (latency)
        messages = self.client.consume(num_messages=max_records, timeout=0)
        if not messages and timeout > 0:
            first = self.client.poll(timeout)
            if first is not None:
                messages = [first, *self.client.consume(num_messages=max_records - 1,
                                                        timeout=0)] \
                    if max_records > 1 else [first]
        out: dict[TopicPartition, list[Record]] = {}
        for m in messages:
            error = m.error()
            if error is not None:
                self._on_error(error)
                continue
            tp = TopicPartition(m.topic(), m.partition())
            if tp in self._paused:  # fetched before the pause: seen again after it
                continue
            out.setdefault(tp, []).append(SourceRecord(
                tp.topic, tp.partition, m.offset(), m.key(), m.value(),
                tuple(m.headers() or ())))
        with self._lock:
            error, self._error = self._error, None
        if error is not None and not out:
            if error.code() == KafkaError.FENCED_INSTANCE_ID:
                raise ConfigError(f"another consumer uses group.instance.id "
                                  f"{self.config.group_instance_id!r}: {error.str()}")
            if error.fatal():
                raise SourceUnavailable(f"Kafka client failed ({error.str()})", reset=True)
            if error.code() in _DOWN:
                raise SourceUnavailable(f"Kafka unavailable ({error.str()})")
            log.debug("consumer %s: %s", self.group_id, error.str())
        return out

    def _call(self, method: str, *args: Any) -> None:
        try:
            getattr(self.client, method)(*args)
        except KafkaException as exc:  # not assigned any more: the next owner decides
            log.debug("consumer %s: %s %s: %s", self.group_id, method, args, exc)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._call("seek", _ctp(tp, offset))

    def pause(self, tp: TopicPartition) -> None:
        self._paused.add(tp)
        self._call("pause", [_ctp(tp)])

    def resume(self, tp: TopicPartition) -> None:
        self._paused.discard(tp)
        self._call("resume", [_ctp(tp)])

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        try:
            self.client.commit(offsets=[_ctp(tp, o) for tp, o in offsets.items()],
                               asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            code = error.code() if isinstance(error, KafkaError) else None
            text = error.str() if isinstance(error, KafkaError) else str(exc)
            if code in _REFUSED:
                raise CommitRefused(text) from exc
            raise CommitFailed(text) from exc

    def assignment(self) -> set[TopicPartition]:
        return set(_ours(self.client.assignment())) if self.client is not None else set()

    def lag(self) -> dict[TopicPartition, int]:
        assigned = self.client.assignment()
        lags: dict[TopicPartition, int] = {}
        for p, position in zip(assigned, self.client.position(assigned), strict=True):
            _, high = self.client.get_watermark_offsets(p, timeout=1.0, cached=False)
            if position.offset >= 0:
                lags[TopicPartition(p.topic, p.partition)] = max(0, high - position.offset)
        return lags

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()

