"""Attempts survive the process: a poison event reaches the dead-letter topic after
`max_attempts` attempts in total, even when the consumer is SIGKILLed between attempts,
and a handler that hangs is bounded by `handler_timeout` (one attempt per timeout)."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox import Event
from outbox.consumer import EXIT_HANDLER_TIMEOUT
from outbox.serde import JsonSerializer
from tests.integration.test_consumer import (
    client,  # noqa: F401  (fixture)
    counter_table,  # noqa: F401  (fixture)
    counters,
    inbox_ids,
    processes,  # noqa: F401  (fixture)
    produce_events,
    read_topic,
    start_consumer,
    stop_process,
    wait_for,
)

MAX_ATTEMPTS = 3


def poison_events(topic: str) -> tuple[list[Event], Event]:
    json_ = JsonSerializer()
    payloads: list[dict[str, object]] = [{"i": 0}, {"i": 1, "poison": True}, {"i": 2}]
    evs = [Event(topic=topic, key="k", type="T", payload=p, data=json_.dumps(p))
           for p in payloads]
    return evs, evs[1]


def attempts_of(engine: sa.Engine, event_id: uuid.UUID) -> int:
    with engine.connect() as c:
        return int(c.scalar(sa.text(
            "SELECT attempts FROM outbox_attempts WHERE event_id = :e"), {"e": event_id}) or 0)


def test_a_poison_event_is_dead_lettered_after_max_attempts_in_total_across_sigkills(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,  # noqa: F811
    new_topic: Callable[..., str], processes: list, tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch, client: str,  # noqa: F811
) -> None:
    topic = new_topic(1)
    group = f"poison-{uuid.uuid4().hex[:6]}"
    evs, bad = poison_events(topic)
    produce_events(kafka_bootstrap, topic, evs)
    calls = tmp_path / "calls"
    monkeypatch.setenv("POISON_CALLS", str(calls))
    monkeypatch.setenv("POISON_MAX_ATTEMPTS", str(MAX_ATTEMPTS))
    monkeypatch.setenv("POISON_RETRY_BACKOFF", "60")  # the retry would wait: kill before

    for attempt in range(1, MAX_ATTEMPTS):
        proc = start_consumer("tests.integration.misbehaving_app:Poison", db_url,
                              kafka_bootstrap, topic, group, tmp_path / f"run{attempt}.log",
                              client=client)
        processes.append(proc)
        wait_for(f"attempt {attempt} recorded",
                 lambda a=attempt: attempts_of(counter_table, bad.id) == a, 60,  # type: ignore[misc]
                 step=lambda: time.sleep(0.2))
        proc.send_signal(signal.SIGKILL)  # between two attempts
        proc.wait(10)
    assert calls.read_text().split().count(str(bad.id)) == MAX_ATTEMPTS - 1

    last = start_consumer("tests.integration.misbehaving_app:Poison", db_url, kafka_bootstrap,
                          topic, group, tmp_path / "last.log", client=client)
    processes.append(last)
    wait_for("the rest applied", lambda: len(counters(counter_table)) == 2, 60,
             step=lambda: time.sleep(0.2))
    rc, _ = stop_process(last)
    assert rc == 0, (tmp_path / "last.log").read_text()[-3000:]
    assert calls.read_text().split().count(str(bad.id)) == MAX_ATTEMPTS  # in total
    dead = read_topic(kafka_bootstrap, topic + ".dlq", expect=1)
    assert len(dead) == 1
    key, headers, value = dead[0]
    assert (key, value) == (b"k", bad.data)
    assert (headers["ce_id"], headers["outbox_reason"]) == (str(bad.id).encode(),
                                                           b"handler-failed")
    assert headers["outbox_error"] == b"RuntimeError: poison on purpose"
    assert set(counters(counter_table)) == {evs[0].id, evs[2].id}
    assert set(counters(counter_table).values()) == {1}
    assert bad.id in inbox_ids(counter_table, group) and attempts_of(counter_table, bad.id) == 0


def test_a_handler_that_hangs_past_handler_timeout_costs_one_attempt_per_run(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,  # noqa: F811
    new_topic: Callable[..., str], processes: list, tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch, client: str,  # noqa: F811
) -> None:
    topic = new_topic(1)
    group = f"hang-{uuid.uuid4().hex[:6]}"
    evs, bad = poison_events(topic)
    produce_events(kafka_bootstrap, topic, evs)
    monkeypatch.setenv("POISON_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("OUTBOX_HANDLER_TIMEOUT", "2")
    for run in (1, 2):  # each run: the handler hangs, the watchdog counts it and exits
        log = tmp_path / f"run{run}.log"
        proc = start_consumer("tests.integration.misbehaving_app:HangOnPoison", db_url,
                              kafka_bootstrap, topic, group, log, client=client)
        processes.append(proc)
        started = time.monotonic()
        assert proc.wait(timeout=60) == EXIT_HANDLER_TIMEOUT, log.read_text()[-3000:]
        out = log.read_text()
        assert f"the handler for event {bad.id}" in out and "longer than handler_timeout (2 s)" \
            in out and "counted as a failed attempt" in out, out[-3000:]
        assert "Traceback" not in out
        assert attempts_of(counter_table, bad.id) == run
        assert time.monotonic() - started < 40
    # the third run does not call the handler for it: dead-lettered, the rest applied
    log = tmp_path / "run3.log"
    last = start_consumer("tests.integration.misbehaving_app:HangOnPoison", db_url,
                          kafka_bootstrap, topic, group, log, client=client)
    processes.append(last)
    wait_for("the rest applied", lambda: len(counters(counter_table)) == 2, 60,
             step=lambda: time.sleep(0.2))
    rc, _ = stop_process(last)
    assert rc == 0, log.read_text()[-3000:]
    dead = read_topic(kafka_bootstrap, topic + ".dlq", expect=1)
    assert len(dead) == 1 and dead[0][1]["outbox_error"].startswith(
        b"HandlerTimeout: the handler ran longer than handler_timeout (2 s)")
