"""After a record fails, nothing sent later may reach Kafka before the relay resends it:
kafka-python's idempotent producer would otherwise bump its epoch and keep draining, and a
later event of the key would overtake the failed one (the chaos suite caught that)."""

from __future__ import annotations

import time
from collections.abc import Callable

from kafka import KafkaConsumer

from outbox.publisher import KafkaPublisher, KafkaSettings, SendsHalted, breaks_producer


def test_the_first_failure_stops_the_producer_until_it_is_replaced(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=1)
    publisher = KafkaPublisher(KafkaSettings(kafka_bootstrap, linger_ms=0))
    try:
        warm = publisher.send(topic, b"k", b"warm", [])
        while not warm.done():
            publisher.flush(1.0)
        assert warm.error() is None
        # The broker refuses it (over message.max.bytes): a batch fails in the I/O thread.
        first = publisher.send(topic, b"k", b"x" * (2 * 1024 * 1024), [])
        deadline = time.monotonic() + 20
        while not first.done() and time.monotonic() < deadline:
            publisher.flush(0.5)
        assert first.done() and first.error() is not None
        later = publisher.send(topic, b"k", b"must-not-overtake", [])
        assert later.done() and isinstance(later.error(), SendsHalted)
        assert breaks_producer(later.error())  # type: ignore[arg-type]
        publisher.recover()
        again = publisher.send(topic, b"k", b"after-recover", [])
        while not again.done():
            publisher.flush(1.0)
        assert again.error() is None
    finally:
        publisher.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    values = [r.value for r in consumer]
    consumer.close()
    assert values == [b"warm", b"after-recover"]
