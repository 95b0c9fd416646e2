"""The fast lane: a `Publisher` on confluent-kafka (librdkafka), the `[confluent]` extra.

Same contract as `KafkaPublisher`: idempotence and acks=all set and checked, per-partition
order under retries (librdkafka's idempotent producer keeps it with up to 5 requests in
flight), one `Delivery` per record, errors classified permanent or retriable the same
way. librdkafka runs its network I/O in C threads, off the GIL, which is where the
throughput comes from; delivery reports are served on the relay's thread by `flush`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from outbox.errors import ConfigError
from outbox.event import KafkaHeaders
from outbox.publisher import (
    Delivery,
    FailedDelivery,
    KafkaSettings,
    NotSent,
    TopicUnavailable,
)

try:
    from confluent_kafka import KafkaError, KafkaException, Producer
except ImportError as exc:  # pragma: no cover - exercised by the CLI's error test
    raise ImportError(
        "the confluent-kafka client is an optional extra: "
        "pip install 'transactional-outbox[confluent]'") from exc

# librdkafka error codes after which the record will never be accepted.
_PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE: "MessageSizeTooLargeError",
    KafkaError.INVALID_MSG_SIZE: "MessageSizeTooLargeError",
    KafkaError.RECORD_LIST_TOO_LARGE: "RecordListTooLargeError",
    KafkaError.TOPIC_EXCEPTION: "InvalidTopicError",
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "TopicAuthorizationFailedError",
    KafkaError.INVALID_RECORD: "InvalidRecordError",
    KafkaError.INVALID_MSG: "CorruptRecordError",
    KafkaError._INVALID_ARG: "InvalidRecordError",
}
_NO_TOPIC = {KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART}


class DeliveryFailed(Exception):
    """A librdkafka delivery error; `permanent` says the record will never be accepted,
    `fatal` that the producer is unusable and must be replaced."""

    def __init__(self, error: Any, name: str | None = None) -> None:
        super().__init__(f"{error.name()}: {error.str()}")
        self.code = error.code()
        self.permanent = name is not None
        self.fatal = bool(error.fatal())
        self.kind = name or error.name()


def classify(error: Any) -> BaseException:
    """Map a librdkafka KafkaError onto the outbox's error classes."""
    code = error.code()
    if code in _NO_TOPIC:
        return TopicUnavailable(f"{error.name()}: {error.str()}")
    return DeliveryFailed(error, _PERMANENT.get(code))


def _kafka_exception(raised: BaseException) -> Any:
    """The KafkaException behind `raised`. A transactional producer that is fenced or
    failed during `flush()` sets a KafkaException and then still runs delivery reports;
    the first C call of the report's Python callback fails with a SystemError whose
    cause is that KafkaException (seen with confluent-kafka 2.16.1, fenced while adding
    partitions to the transaction). Anything else is re-raised: a bug, not Kafka's
    answer."""
    seen: BaseException | None = raised
    while seen is not None:
        if isinstance(seen, KafkaException) and seen.args:
            return seen
        seen = seen.__cause__  # not __context__: a bug raised while handling one is a bug
    raise raised


class _Delivery:
    """Filled in by librdkafka's delivery report; the object is the callback itself, so
    a send allocates one small object and no closure."""

    __slots__ = ("_done", "_error")

    def __init__(self) -> None:
        self._done = False
        self._error: BaseException | None = None

    def __call__(self, error: Any, message: Any) -> None:
        if error is not None:
            self._error = classify(error)
        self._done = True

    def done(self) -> bool:
        return self._done

    def error(self) -> BaseException | None:
        return self._error


def producer_config(settings: KafkaSettings) -> dict[str, Any]:
    """librdkafka settings from the relay's; `extra` (from --kafka-option) passes through,
    but may not turn idempotence or acks=all off."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "linger.ms": settings.linger_ms,
        "batch.size": settings.batch_size,
        "message.max.bytes": settings.max_request_size,
        "request.timeout.ms": settings.request_timeout_ms,
        # Never time a message out in librdkafka: it fails a timed-out message yet lets
        # later ones of its partition through once the broker is back (a gap, which
        # enable.gapless.guarantee does not cover), so a key's later event could land
        # first. The caller bounds the wait instead (the relay: --delivery-timeout-ms
        # + 10 s) and then replaces the producer, purged: the broker keeps a prefix.
        "message.timeout.ms": 0,
        "max.in.flight.requests.per.connection": 5,
        "compression.type": settings.compression_type or "none",
        "topic.metadata.propagation.max.ms": settings.max_block_ms,
        "queue.buffering.max.kbytes": 256 * 1024,
        # kafka-python's and Java's partitioner: a key keeps its partition when a relay
        # switches clients (librdkafka's own default, consistent_random, is CRC32).
        "partitioner": "murmur2_random",
    }
    for key, value in settings.extra.items():
        config[key] = value
    for key in ("message.timeout.ms", "delivery.timeout.ms"):
        if key in settings.extra:
            raise ConfigError(f"{key} is the relay's to bound (--delivery-timeout-ms): a "
                              "message librdkafka times out can leave a gap in its "
                              "partition, so the producer never times one out")
    if str(config.get("enable.idempotence", "true")).lower() not in ("true", "1"):
        raise ConfigError("the outbox's producer needs enable.idempotence=true")
    if str(config.get("acks", "all")).lower() not in ("all", "-1"):
        raise ConfigError("the outbox's producer needs acks=all")
    config["enable.idempotence"] = True
    config["acks"] = "all"
    return config


class ConfluentPublisher:
    """confluent-kafka's `Producer` with `enable.idempotence=true` and `acks=all`."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.config = producer_config(settings)
        self._producer = self._make_producer()

    def _make_producer(self) -> Any:
        try:
            producer = Producer(self.config)
        except KafkaException as exc:
            raise ConfigError(f"confluent-kafka refused the producer settings: {exc}") from exc
        return producer

    def send(self, topic: str, key: bytes, value: bytes, headers: KafkaHeaders) -> Delivery:
        delivery = _Delivery()
        try:
            self._producer.produce(topic, value, key, on_delivery=delivery, headers=headers)
        except BufferError:
            # The local queue is full: serve delivery reports for a moment, then retry once.
            self._producer.poll(0.1)
            try:
                self._producer.produce(topic, value, key, on_delivery=delivery,
                                       headers=headers)
            except BufferError as exc:
                return FailedDelivery(NotSent(f"the producer's queue is full: {exc}"))
            except KafkaException as exc:
                return FailedDelivery(classify(exc.args[0]))
        except KafkaException as exc:
            return FailedDelivery(classify(exc.args[0]))
        return delivery

    def flush(self, timeout: float) -> None:
        self._producer.flush(timeout)

    def recover(self) -> None:
        """Replace the producer (after a fatal error librdkafka refuses every later send).
        What the old one still holds is purged: the relay sends those events again."""
        self._drop()
        self._producer = self._make_producer()

    def close(self, timeout: float = 5.0) -> None:
        if self._producer.flush(max(0.0, timeout)):
            self._drop()  # unacknowledged: they stay in the outbox, sent by the next relay

    def _drop(self) -> None:
        try:
            self._producer.purge(True, True, False)
            self._producer.flush(0)
        except Exception:  # a broken producer is being thrown away anyway
            pass


class ConfluentTxnProducer:
    """confluent-kafka's transactional producer (see outbox.txn). A message that fails
    or times out fails its transaction, which is aborted and sent again whole, so here
    librdkafka may time messages out (within the transaction timeout)."""

    def __init__(self, settings: KafkaSettings, transactional_id: str,
                 transaction_timeout_ms: int) -> None:
        config = producer_config(settings)
        config.update({"transactional.id": transactional_id,
                       "transaction.timeout.ms": transaction_timeout_ms,
                       "message.timeout.ms": transaction_timeout_ms})
        self.transactional_id = transactional_id
        try:
            self._producer = Producer(config)
        except KafkaException as exc:
            raise ConfigError(f"confluent-kafka refused the producer settings: {exc}") from exc
        self._timeout = transaction_timeout_ms / 1000
        self._call(self._producer.init_transactions, self._timeout)

    def _call(self, fn: Any, *args: Any) -> None:
        from outbox.txn import Fenced, TxnFailed

        try:
            fn(*args)
        except (KafkaException, SystemError) as raised:
            exc = _kafka_exception(raised)
            error = exc.args[0]
            if error.code() in (KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                                KafkaError.CLUSTER_AUTHORIZATION_FAILED):
                raise ConfigError(f"Kafka refused the transactional id ({error.str()}): "
                                  "grant the relay's principal WRITE and DESCRIBE on "
                                  "transactional ids outbox-<prefix>-shard-*") from exc
            if error.fatal() or error.code() in (KafkaError._FENCED,
                                                 KafkaError.PRODUCER_FENCED,
                                                 KafkaError.INVALID_PRODUCER_EPOCH):
                raise Fenced(f"{error.name()}: {error.str()}") from exc
            raise TxnFailed(f"{error.name()}: {error.str()}") from exc

    def begin(self) -> None:
        self._call(self._producer.begin_transaction)

    def send(self, topic: str, key: bytes, value: bytes, headers: KafkaHeaders,
             partition: int | None = None) -> Delivery:
        delivery = _Delivery()
        options: dict[str, Any] = {"on_delivery": delivery, "headers": headers}
        if partition is not None:
            options["partition"] = partition
        try:
            self._producer.produce(topic, value, key, **options)
        except BufferError as exc:
            return FailedDelivery(NotSent(f"the producer's queue is full: {exc}"))
        except KafkaException as exc:
            return FailedDelivery(classify(exc.args[0]))
        return delivery

    def flush(self, timeout: float) -> None:
        self._call(self._producer.flush, timeout)

    def commit(self, timeout: float) -> None:
        self._call(self._producer.commit_transaction, timeout)

    def abort(self, timeout: float) -> None:
        self._call(self._producer.abort_transaction, timeout)

    def close(self, timeout: float) -> None:
        """An open transaction is left to the next owner's init (which aborts it). Never
        raises: a fenced or failed producer is being thrown away anyway."""
        with contextlib.suppress(Exception):
            self._producer.flush(max(0.0, min(timeout, 1.0)))
