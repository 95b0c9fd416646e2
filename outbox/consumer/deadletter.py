"""The dead-letter sink: a record the consumer gives up on goes to `<topic><dlq_suffix>`.

A copy carries the original key, value and headers plus `outbox_error`, `outbox_reason`
(handler-failed or malformed) and the original's coordinates. It goes through the
relay's `Publisher` interface (kafka-python's KafkaPublisher, the confluent one, or an
in-memory one), and `send` returns only once Kafka acknowledged it: the partition moves
on only after that. The runner sends copies after its database transaction committed,
never while one is open.

A copy the client or the broker refuses for its size is sent truncated (no value; the
key and headers cut to a few KiB; `outbox_truncated` says what was cut). If even that is
refused, `DeadLetterStuck` says so: waiting will not help until the dead-letter topic's
`max.message.bytes` is raised, and the runner's health check turns red.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from outbox.backoff import first_line
from outbox.consumer.source import Record, is_too_large
from outbox.publisher import Publisher

log = logging.getLogger("outbox.consumer")

REASON_FAILED = "handler-failed"
REASON_MALFORMED = "malformed"
#: The headers a dead-lettered record gets on top of its own.
DLQ_HEADERS = ("outbox_error", "outbox_original_topic", "outbox_original_partition",
               "outbox_original_offset", "outbox_reason", "outbox_truncated",
               "outbox_original_size")
#: What a truncated copy keeps: the key up to this size, original headers up to these.
TRUNCATED_KEY_BYTES = 1024
TRUNCATED_HEADER_BYTES = 1024
TRUNCATED_HEADERS_TOTAL = 16 * 1024


class DeadLetterFailed(Exception):
    """The copy was not acknowledged (Kafka unreachable, a timeout): try again later."""


class CopyTooLarge(DeadLetterFailed):
    """The client or the broker refused a dead-letter copy for its size."""


class DeadLetterStuck(DeadLetterFailed):
    """Even the truncated copy was refused for its size: waiting will not help until the
    dead-letter topic's limit is raised."""


def dead_letter_headers(headers: Iterable[tuple[str, bytes | None]], *, topic: str,
                        partition: int, offset: int, reason: str,
                        error: str) -> list[tuple[str, bytes]]:
    """The original headers (minus earlier outbox_* ones) plus the error and the origin."""
    out = [(k, v if v is not None else b"") for k, v in headers if k not in DLQ_HEADERS]
    out += [
        ("outbox_error", error[:4000].encode(errors="replace")),
        ("outbox_original_topic", topic.encode()),
        ("outbox_original_partition", str(partition).encode()),
        ("outbox_original_offset", str(offset).encode()),
        ("outbox_reason", reason.encode()),
    ]
    return out


def truncated_dead_letter(key: bytes | None, value: bytes | None,
                          headers: list[tuple[str, bytes]]
                          ) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """A dead-letter copy small enough for any sane topic, from the whole one
    (`dead_letter_headers` applied): no value, the key and the original headers cut to
    a few KiB, the outbox_* headers (the original's coordinates, the error) kept, plus
    `outbox_truncated` (what was cut: value, key, headers) and `outbox_original_size`
    (key + value + original headers, in bytes)."""
    own = [(k, v) for k, v in headers if k in DLQ_HEADERS]
    original = [(k, v) for k, v in headers if k not in DLQ_HEADERS]
    size = len(key or b"") + len(value or b"") + sum(len(k.encode()) + len(v)
                                                    for k, v in original)
    cut = ["value"]
    if key is not None and len(key) > TRUNCATED_KEY_BYTES:
        key = key[:TRUNCATED_KEY_BYTES]
        cut.append("key")
    kept: list[tuple[str, bytes]] = []
    total = 0
    for k, v in original:
        n = len(k.encode()) + len(v)
        if n > TRUNCATED_HEADER_BYTES or total + n > TRUNCATED_HEADERS_TOTAL:
            continue
        kept.append((k, v))
        total += n
    if len(kept) < len(original):
        cut.append("headers")
    own = [(k, v) for k, v in own if k not in ("outbox_truncated", "outbox_original_size")]
    own += [("outbox_truncated", ",".join(cut).encode()),
            ("outbox_original_size", str(size).encode())]
    return key, b"", kept + own


class DeadLetterSink:
    """Sends dead-letter copies through a Publisher made on first use, and waits for each
    acknowledgement (at most `timeout` seconds)."""

    def __init__(self, make_publisher: Callable[[], Publisher], *, suffix: str,
                 timeout: float, group_id: str) -> None:
        self._make = make_publisher
        self.suffix = suffix
        self.timeout = timeout
        self.group_id = group_id
        self.publisher: Publisher | None = None

    def topic_for(self, record: Record) -> str:
        return record.topic + self.suffix

    def send(self, record: Record, reason: str, error: str) -> str:
        """Send the copy and wait for the ack; if it is refused for its size, send a
        truncated copy. Returns what was truncated ("" for a whole copy). Raises
        DeadLetterStuck, or DeadLetterFailed for what may heal by waiting."""
        topic = self.topic_for(record)
        headers = dead_letter_headers(record.headers or (), topic=record.topic,
                                      partition=record.partition, offset=record.offset,
                                      reason=reason, error=error)
        try:
            self._send_copy(topic, record.key, record.value, headers)
            return ""
        except CopyTooLarge as exc:
            refused = exc
        key, value, small = truncated_dead_letter(record.key, record.value, headers)
        log.warning("consumer %s: the dead-letter copy of %s[%d] offset %d is too large for "
                    "%s (%s); sending it truncated", self.group_id, record.topic,
                    record.partition, record.offset, topic, refused)
        try:
            self._send_copy(topic, key, value, small)
        except CopyTooLarge as exc:
            raise DeadLetterStuck(f"whole: {refused}; truncated: {exc}") from exc
        return dict(small)["outbox_truncated"].decode()

    def _send_copy(self, topic: str, key: bytes | None, value: bytes | None,
                   headers: list[tuple[str, bytes]]) -> None:
        publisher = self._publisher()
        delivery = publisher.send(topic, cast(bytes, key), cast(bytes, value), headers)
        deadline = time.monotonic() + self.timeout
        while not delivery.done() and time.monotonic() < deadline:
            publisher.flush(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
        error = delivery.error() if delivery.done() else TimeoutError(
            f"no acknowledgement within {self.timeout:g} s")
        if error is None:
            return
        # a fresh producer (and producer id) after any failed send, so no sequence
        # number state of the failed one is carried on
        self._recover()
        if is_too_large(error):
            raise CopyTooLarge(first_line(error)) from error
        raise DeadLetterFailed(first_line(error)) from error

    def _publisher(self) -> Publisher:
        if self.publisher is None:
            try:
                self.publisher = self._make()
            except Exception as exc:
                from outbox.errors import ConfigError

                if isinstance(exc, ConfigError):
                    raise
                raise DeadLetterFailed(first_line(exc)) from exc
        return self.publisher

    def _recover(self) -> None:
        publisher = self.publisher
        if publisher is None:
            return
        try:
            publisher.recover()
        except Exception as exc:  # Kafka down: make a new one on the next send
            log.debug("consumer %s: dead-letter publisher not recovered: %s",
                      self.group_id, exc)
            self.close()

    def close(self) -> None:
        publisher, self.publisher = self.publisher, None
        if publisher is not None:
            try:
                publisher.close(timeout=2)
            except Exception as exc:
                log.warning("consumer %s: closing the dead-letter publisher: %s",
                            self.group_id, exc)


def describe(record: Record) -> str:
    return f"{record.topic}[{record.partition}] offset {record.offset}"


__all__: list[Any] = ["DLQ_HEADERS", "REASON_FAILED", "REASON_MALFORMED", "CopyTooLarge",
                      "DeadLetterFailed", "DeadLetterSink", "DeadLetterStuck",
                      "dead_letter_headers", "truncated_dead_letter"]
