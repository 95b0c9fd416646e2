"""Dead-letter copies go through the relay's publishers (make_publisher, KafkaSettings):
the settings each client gets, a fail-stop publisher recovered after a failed copy, and
both clients' size refusals recognised so the copy is sent truncated."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError

from outbox.confluent import ConfluentPublisher, classify
from outbox.consumer import ConsumerConfig
from outbox.consumer.config import (
    DLQ_MAX_REQUEST_BYTES,
    dead_letter_publisher,
    dead_letter_settings,
)
from outbox.consumer.deadletter import DeadLetterFailed, DeadLetterSink
from outbox.consumer.source import SourceRecord, is_too_large
from outbox.publisher import FailedDelivery, SendsHalted


def test_kafka_python_copies_get_the_relay_settings_and_only_the_security_options() -> None:
    cfg = ConsumerConfig(kafka="k:9", dlq_timeout=20, client_id="c1", kafka_config={
        "security_protocol": "SSL", "sasl_mechanism": "PLAIN", "fetch_min_bytes": 1})
    s = dead_letter_settings(cfg)
    assert (s.bootstrap_servers, s.client_id, s.linger_ms) == ("k:9", "c1-dlq", 0)
    assert s.max_request_size == DLQ_MAX_REQUEST_BYTES
    assert (s.request_timeout_ms, s.delivery_timeout_ms, s.max_block_ms) == (20_000,) * 3
    assert s.extra == {"bootstrap_timeout_ms": 5000, "security_protocol": "SSL",
                       "sasl_mechanism": "PLAIN"}


def test_confluent_copies_go_through_the_relays_confluent_publisher() -> None:
    cfg = ConsumerConfig(kafka="k:9", client="confluent", client_id="c1", kafka_config={
        "security.protocol": "PLAINTEXT", "fetch.min.bytes": "1"})
    publisher = dead_letter_publisher(cfg)
    try:
        assert isinstance(publisher, ConfluentPublisher)
        config = publisher.config
        assert config["security.protocol"] == "PLAINTEXT" and "fetch.min.bytes" not in config
        assert config["enable.idempotence"] is True and config["acks"] == "all"
        assert config["message.max.bytes"] == DLQ_MAX_REQUEST_BYTES
        assert config["client.id"] == "c1-dlq" and config["linger.ms"] == 0
    finally:
        publisher.close(timeout=0)


def test_both_clients_size_refusals_are_recognised() -> None:
    from kafka.errors import MessageSizeTooLargeError

    assert is_too_large(classify(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)))
    assert is_too_large(MessageSizeTooLargeError("too big"))
    assert not is_too_large(classify(KafkaError(KafkaError._MSG_TIMED_OUT)))
    assert not is_too_large(SendsHalted("an earlier record failed"))


class Acked:
    def done(self) -> bool:
        return True

    def error(self) -> BaseException | None:
        return None


class FailStop:
    """Like KafkaPublisher: the first failure halts every later send until recover()."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.halted = False
        self.sent: list[tuple[str, bytes]] = []
        self.recovered = 0

    def send(self, topic: str, key: bytes, value: bytes, headers: Any) -> Any:
        if self.halted:
            return FailedDelivery(SendsHalted("halted"))
        if self.fail_first > 0:
            self.fail_first -= 1
            self.halted = True
            return FailedDelivery(TimeoutError("no ack"))
        self.sent.append((topic, key))
        return Acked()

    def flush(self, timeout: float) -> None:
        return None

    def recover(self) -> None:
        self.recovered += 1
        self.halted = False

    def close(self, timeout: float = 5.0) -> None:
        return None


def test_a_failed_copy_recovers_the_fail_stop_publisher_so_the_next_try_is_sent() -> None:
    publisher = FailStop(fail_first=1)
    sink = DeadLetterSink(lambda: publisher, suffix=".dlq", timeout=1, group_id="g")
    record = SourceRecord("t", 0, 7, b"k", b"v", ())
    with pytest.raises(DeadLetterFailed):
        sink.send(record, "handler-failed", "boom")
    assert publisher.recovered == 1 and not publisher.halted
    assert sink.send(record, "handler-failed", "boom") == ""
    assert publisher.sent == [("t.dlq", b"k")]
