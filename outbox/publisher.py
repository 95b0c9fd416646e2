"""Publishers: where the relay sends records. Kafka for real; in memory for tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from outbox.errors import ConfigError
from outbox.event import KafkaHeaders

# Errors after which a record will never be accepted: dead-letter at once, don't retry.
PERMANENT_ERRORS = frozenset({
    "MessageSizeTooLargeError",
    "RecordTooLargeError",
    "InvalidTopicError",
    "TopicAuthorizationFailedError",
    "InvalidRecordError",
    "CorruptRecordError",
    "RecordListTooLargeError",
})




class TopicUnavailable(Exception):
    """Kafka gave no metadata for the topic in time: it does not exist (and the broker
    does not auto-create it), or the broker refuses the name. Retriable: it counts as an
    attempt of the event that hit it, and only that event's shard waits."""


class NotSent(Exception):
    """The producer did not take the record (its buffer stayed full): not an attempt."""


class SendsHalted(NotSent):
    """Not sent: an earlier record failed, and the producer stopped sending so that no
    later record could reach Kafka before it (per-key order). Not an attempt; the
    producer is replaced and the shards resent from their first unacknowledged event."""

    fatal = True


def is_permanent(error: BaseException) -> bool:
    """The record will never be accepted: dead-letter it (once it is known to be the one)."""
    flag = getattr(error, "permanent", None)
    return bool(flag) if flag is not None else type(error).__name__ in PERMANENT_ERRORS


def is_attempt(error: BaseException) -> bool:
    """Whether a failed send counts against the event's `max_attempts`: not when the
    record never reached Kafka, nor when the producer failed as a whole (fatal)."""
    return not isinstance(error, NotSent) and not getattr(error, "fatal", False)


def breaks_producer(error: BaseException) -> bool:
    """Whether the producer must be replaced after this error. Our own refusals
    (no metadata, full buffer) never reached Kafka, so they leave it intact."""
    fatal = getattr(error, "fatal", None)  # librdkafka says so, and SendsHalted
    if fatal is not None:
        return bool(fatal)
    return not isinstance(error, TopicUnavailable | NotSent)


class Delivery(Protocol):
    """The outcome of one send: done or not, and the error if it failed."""

    def done(self) -> bool: ...

    def error(self) -> BaseException | None: ...


class Publisher(Protocol):
    """Sends records asynchronously; `flush` waits (bounded) for outstanding deliveries."""

    def send(self, topic: str, key: bytes, value: bytes, headers: KafkaHeaders) -> Delivery: ...

    def flush(self, timeout: float) -> None: ...

    def recover(self) -> None:
        """Called after a failed delivery: make later sends possible again."""

    def close(self, timeout: float = 5.0) -> None: ...


class _KafkaDelivery:
    __slots__ = ("_future",)

    def __init__(self, future: Any) -> None:
        self._future = future

    def done(self) -> bool:
        return bool(self._future.is_done)

    def error(self) -> BaseException | None:
        exc = self._future.exception if self._future.is_done else None
        return exc if isinstance(exc, BaseException) else None


class FailedDelivery:
    """A send that failed before it reached the client: done, with its error."""

    __slots__ = ("_error",)

    def __init__(self, error: BaseException) -> None:
        self._error = error

    def done(self) -> bool:
        return True

    def error(self) -> BaseException | None:
        return self._error


@dataclass
class KafkaSettings:
    """Producer settings the relay exposes; idempotence and acks=all are not optional."""

    bootstrap_servers: str
    linger_ms: int = 5
    batch_size: int = 256 * 1024
    compression_type: str | None = None
    # The broker's message.max.bytes decides what is too large, and says so.
    max_request_size: int = 16 * 1024 * 1024
    request_timeout_ms: int = 30_000
    delivery_timeout_ms: int = 120_000
    client_id: str = "outbox-relay"
    # How long one send may block the relay's thread waiting for a topic's metadata (or
    # for buffer space). Keep it well under the relay's lease: a relay blocked past its
    # lease loses its database session, and with it every shard.
    max_block_ms: int = 5000
    extra: dict[str, Any] = field(default_factory=dict)


def kafka_python_options(settings: KafkaSettings) -> dict[str, Any]:
    """kafka-python producer options from the relay's settings, idempotence and acks=all
    included (for the relay's producer and the exactly-once one)."""
    return {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "enable_idempotence": True, "acks": "all",
        "linger_ms": settings.linger_ms, "batch_size": settings.batch_size,
        "compression_type": settings.compression_type,
        "max_request_size": settings.max_request_size,
        "request_timeout_ms": settings.request_timeout_ms,
        "delivery_timeout_ms": settings.delivery_timeout_ms,
        "max_block_ms": settings.max_block_ms,
    }


class KafkaPublisher:
    """kafka-python's producer with `enable_idempotence=True` and `acks="all"`, set explicitly.

    kafka-python silently turns idempotence off when a conflicting option is given, so
    we check after construction that it is really on.

    Fail-stop: when a batch fails, kafka-python's idempotent producer bumps its epoch and
    goes on draining the records it still holds, so a record sent after the failed one
    could reach Kafka first, and a key's order would break (the chaos suite caught it).
    So the first failure stops the producer in kafka-python's own I/O thread, before its
    next drain: every record not yet drained is aborted (SendsHalted), and send() refuses
    until recover(). A lock keeps a send from slipping in between. This uses
    `_accumulator.abort_undrained_batches`, which kafka-python has no public name for;
    the tested version range is pinned, and the constructor checks it is there.
    """

    #: After a topic's metadata times out, later sends to it fail at once for this long,
    #: so one bad topic blocks the relay once per backoff round, not once per event.
    TOPIC_QUARANTINE = 2.0

    def __init__(self, settings: KafkaSettings) -> None:
        extra = dict(settings.extra)
        if extra.pop("enable_idempotence", True) is not True:
            raise ConfigError("the outbox's producer needs enable_idempotence=true")
        if str(extra.pop("acks", "all")).lower() not in ("all", "-1"):
            raise ConfigError("the outbox's producer needs acks=all")
        self.settings = replace(settings, extra=extra)
        self._unavailable: dict[str, tuple[float, TopicUnavailable]] = {}
        # Reentrant: a future that failed before its errback was added calls it at once.
        self._lock = threading.RLock()
        self._halted: SendsHalted | None = None
        self._producer = self._make_producer()

    def _make_producer(self) -> Any:
        from kafka import KafkaProducer

        settings = self.settings
        producer = KafkaProducer(client_id=settings.client_id,
                                 max_in_flight_requests_per_connection=5,
                                 **kafka_python_options(settings), **settings.extra)
        if not producer.config.get("enable_idempotence"):
            producer.close(timeout=1)
            raise RuntimeError("kafka-python disabled idempotence; check the producer options")
        if not hasattr(getattr(producer, "_accumulator", None), "abort_undrained_batches"):
            producer.close(timeout=1)
            raise RuntimeError("this kafka-python version cannot stop a producer after a "
                               "failed batch; install the tested range (see pyproject.toml)")
        return producer

    def _on_failure(self, exc: BaseException) -> None:
        """kafka-python's I/O thread, as a record fails, before it drains anything more."""
        with self._lock:
            if self._halted is not None:
                return
            self._halted = SendsHalted(f"an earlier record failed ({type(exc).__name__}); "
                                       "sends stopped so that nothing overtakes it")
            producer = self._producer
        with contextlib.suppress(Exception):
            producer._accumulator.abort_undrained_batches(self._halted)

    def recover(self) -> None:
        """Replace the producer: after a fatal error kafka-python fails every later send,
        and a producer stuck without a producer id never sends again. The old one is
        closed first, dropping what it still holds (the relay sends those again)."""
        close_producer(self._producer, timeout=0)
        self._producer = self._make_producer()  # may raise: Kafka down, the relay backs off
        with self._lock:
            self._halted = None

    def send(self, topic: str, key: bytes, value: bytes, headers: KafkaHeaders) -> Delivery:
        quarantined = self._unavailable.get(topic)
        if quarantined is not None:
            if time.monotonic() < quarantined[0]:
                return FailedDelivery(quarantined[1])
            del self._unavailable[topic]
        try:
            with self._lock:
                if self._halted is not None:
                    return FailedDelivery(self._halted)
                future = self._producer.send(topic, key=key, value=value, headers=headers)
                future.add_errback(self._on_failure)
            return _KafkaDelivery(future)
        except Exception as exc:  # raised synchronously, e.g. size checks, closed producer
            from kafka.errors import KafkaTimeoutError

            if isinstance(exc, KafkaTimeoutError):
                if "metadata" in str(exc):
                    error = TopicUnavailable(
                        f"no metadata for topic {topic!r} within "
                        f"{self.settings.max_block_ms} ms: the topic does not exist and is "
                        "not auto-created, or the broker refuses its name")
                    self._unavailable[topic] = (time.monotonic() + self.TOPIC_QUARANTINE,
                                                error)
                    return FailedDelivery(error)
                return FailedDelivery(NotSent(str(exc)))
            return FailedDelivery(exc)

    def flush(self, timeout: float) -> None:
        with contextlib.suppress(Exception):  # KafkaTimeoutError: the caller checks deliveries
            self._producer.flush(timeout=timeout)

    def close(self, timeout: float = 5.0) -> None:
        close_producer(self._producer, timeout=timeout)


def close_producer(producer: Any, timeout: float) -> None:
    """Close a kafka-python producer for good, even while Kafka does not answer.

    Its close() flushes first and raises if records are still unacknowledged: the
    producer then stays open, its I/O thread keeps sending, and its __del__ prints a
    traceback at exit. Force-close it instead: what it still holds fails (the relay
    sends those events again).
    """
    try:
        producer.close(timeout=timeout)
        return
    except Exception:
        pass
    with contextlib.suppress(Exception):
        producer._sender.force_close()  # the I/O thread aborts the pending batches and exits
        producer._sender.join(1.0)
        producer._accumulator.abort_incomplete_batches()
    with contextlib.suppress(Exception):
        producer.close(timeout=0)  # nothing left to flush: marks the producer closed


@dataclass
class Record:
    topic: str
    key: bytes
    value: bytes
    headers: KafkaHeaders
    partition: int | None = None  # only when the sender chose it


class InMemoryPublisher:
    """A publisher for tests: keeps records in a list; can be told to fail some sends.

    Like Kafka's idempotent producer, once a send to a key fails, later sends to that
    key fail too until `recover()`: what it accepts per key is always a prefix.
    """

    def __init__(self, fail: Callable[[Record], BaseException | None] | None = None) -> None:
        self.records: list[Record] = []
        self.fail = fail
        self._broken: dict[tuple[str, bytes], BaseException] = {}
        self._lock = threading.Lock()

    def send(self, topic: str, key: bytes, value: bytes, headers: KafkaHeaders) -> Delivery:
        record = Record(topic, key, value, list(headers))
        error = self._broken.get((topic, key)) or (self.fail(record) if self.fail else None)
        if error is not None:
            self._broken[(topic, key)] = error
            return FailedDelivery(error)
        with self._lock:
            self.records.append(record)
        return _DELIVERED

    def flush(self, timeout: float) -> None:
        return None

    def recover(self) -> None:
        self._broken.clear()

    def close(self, timeout: float = 5.0) -> None:
        return None

    def event_ids(self) -> list[str]:
        return [dict(r.headers)["ce_id"].decode() for r in self.records]


class _Delivered:
    __slots__ = ()

    def done(self) -> bool:
        return True

    def error(self) -> BaseException | None:
        return None


_DELIVERED = _Delivered()


CLIENTS = ("kafka-python", "confluent")


def make_publisher(client: str, settings: KafkaSettings) -> Publisher:
    """The relay's publisher for `client`: "kafka-python" (the default) or "confluent"
    (librdkafka, the `[confluent]` extra: about 17x the raw throughput on one core)."""
    if client == "kafka-python":
        return KafkaPublisher(settings)
    if client == "confluent":
        from outbox.confluent import ConfluentPublisher

        return ConfluentPublisher(settings)
    raise ValueError(f"unknown Kafka client {client!r}; choose one of {', '.join(CLIENTS)}")


def parse_options(pairs: list[str] | tuple[str, ...], client: str) -> dict[str, Any]:
    """`key=value` client settings (`--kafka-option`), in the client's own spelling:
    librdkafka's dotted names for confluent (`sasl.mechanism=PLAIN`), kafka-python's
    keyword names for kafka-python (`sasl_mechanism=PLAIN`; dots are accepted and turned
    into underscores). Values stay strings for librdkafka; for kafka-python, integers and
    true/false become numbers and booleans."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"Kafka option {pair!r} is not key=value")
        if client == "confluent":
            out[key] = value
            continue
        typed: Any = value
        if value.lower() in ("true", "false"):
            typed = value.lower() == "true"
        else:
            with contextlib.suppress(ValueError):
                typed = int(value)
        out[key.replace(".", "_")] = typed
    return out
