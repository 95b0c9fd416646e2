"""The command's log lines: kafka-python's limited to one per logger and level per
interval; `--log-format json` one JSON object per line, with fields."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from outbox import Event
from outbox.cli import KafkaClientLogLimit
from outbox.logs import JsonFormatter, fields
from tests.unit.consumer_kit import (
    Counter,
    Kit,
    events,
    kit,  # noqa: F401  (fixture)
    run_until,
)


def test_kafka_client_lines_are_limited_and_ours_are_not() -> None:
    limit = KafkaClientLogLimit(interval=60)

    def record(name: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "connection failed %s", (1,), None)

    kafka = [limit.filter(record("kafka.net.manager")) for _ in range(50)]
    assert kafka.count(True) == 1
    assert limit.filter(record("kafka.net.manager", logging.ERROR))
    assert limit.filter(record("kafka.cluster"))
    assert all(limit.filter(record("outbox.relay")) for _ in range(5))


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed as JSON (a line that is not fails the test)."""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return out


def test_json_lines_carry_the_fields_not_just_the_sentence(kit: Kit) -> None:  # noqa: F811
    """The real consumer loop, a handler failing once: its warning as a JSON line has
    the event id, topic, partition, offset, attempt and group as keys."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("outbox.consumer")
    logger.addHandler(handler)
    failed: set[str] = set()

    def once(event: Event) -> None:
        if str(event.id) not in failed:
            failed.add(str(event.id))
            raise RuntimeError("not yet")

    [event] = events("t", 1)
    kit.broker.produce_event(event)
    consumer = Counter(fail=once)
    try:
        run_until(kit.runner(consumer), lambda: len(consumer.calls) == 2, "the retry")
    finally:
        logger.removeHandler(handler)
    lines = json_lines(stream.getvalue())
    [warning] = [x for x in lines if x["level"] == "WARNING"]
    assert {k: warning[k] for k in ("event_id", "topic", "partition", "offset", "attempt",
                                    "consumer_group", "logger")} == {
        "event_id": str(event.id), "topic": "t", "partition": 0, "offset": 0, "attempt": 1,
        "consumer_group": "g", "logger": "outbox.consumer"}
    assert "handler failed" in warning["message"]
    assert warning["time"].endswith("+00:00")


def test_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="not log fields"):
        fields(evnt_id="x")
    assert fields(shard=3, event_id=None) == {"shard": 3}


def test_every_line_of_a_command_is_json(tmp_path: Path) -> None:
    """`outbox --log-format json relay` with its database down: the start, the outage
    (one line per interval), the signal and the stop, each a JSON object with the
    relay's id; no traceback, nothing else on stderr."""
    env = {**os.environ, "OUTBOX_LOG_FORMAT": "json", "OUTBOX_RELAY_ID": "r-json",
           "OUTBOX_DATABASE_URL": "postgresql://outbox:secret@127.0.0.1:1/none",
           "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    proc = subprocess.Popen([sys.executable, "-m", "outbox.cli", "relay"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    lines = json_lines(err)
    messages = [x["message"] for x in lines]
    assert any("starting" in m for m in messages), messages
    assert any("database unavailable" in m for m in messages), messages
    assert any("signal 15" in m for m in messages), messages
    assert any("stopped" in m for m in messages), messages
    assert all(x.get("relay_id") == "r-json" for x in lines if x["logger"] == "outbox.relay")
    assert "secret" not in err
