"""kafka-python's own log lines are limited to one per logger and level per interval."""

from __future__ import annotations

import logging

from outbox.cli import KafkaClientLogLimit


def test_kafka_client_lines_are_limited_and_ours_are_not() -> None:
    limit = KafkaClientLogLimit(interval=60)

    def record(name: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "connection failed %s", (1,), None)

    kafka = [limit.filter(record("kafka.net.manager")) for _ in range(50)]
    assert kafka.count(True) == 1
    assert limit.filter(record("kafka.net.manager", logging.ERROR))
    assert limit.filter(record("kafka.cluster"))
    assert all(limit.filter(record("outbox.relay")) for _ in range(5))
