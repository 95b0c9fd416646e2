"""A handler that hangs is reported as a hanging handler, and SIGTERM still ends the
process within the shutdown grace, without committing the batch.

It used to be reported as "database unavailable" (the database ends a transaction left
idle past idle_in_transaction_session_timeout) and a SIGTERM waited for it forever.
"""

from __future__ import annotations

import logging
import re
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Event, IdempotentConsumer
from outbox.consumer import EXIT_NOT_STOPPED, ConsumerRunner
from tests.integration.consumer_app import bump
from tests.integration.test_consumer import (
    client,  # noqa: F401  (fixture)
    committed_offsets,
    counter_table,  # noqa: F401  (fixture)
    counters,
    inbox_ids,
    make_events,
    make_runner,
    processes,  # noqa: F401  (fixture)
    produce_events,
    run_until,
    runners,  # noqa: F401  (fixture)
    start_consumer,
    wait_for,
)

GRACE = 10.0  # ConsumerRunner's default shutdown_grace, which `outbox consume` uses
REPORT = 10.0  # and its default hang_report_interval


def test_a_hanging_handler_is_reported_and_sigterm_ends_the_process_within_the_grace(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,  # noqa: F811
    new_topic: Callable[..., str], processes: list,  # noqa: F811
    tmp_path: Path, client: str,  # noqa: F811
) -> None:
    topic = new_topic(1)
    group = f"hang-{uuid.uuid4().hex[:6]}"
    events = make_events(topic, 3, keys=1)
    produce_events(kafka_bootstrap, topic, events)
    log = tmp_path / "hang.log"
    proc = start_consumer("tests.integration.misbehaving_app:Hang", db_url, kafka_bootstrap,
                          topic, group, log, client=client)
    processes.append(proc)

    line = re.compile(rf"handler for event {events[0].id} \({re.escape(topic)}\[0\] offset 0\)"
                      r" has been running (\d+) s")
    wait_for("the watchdog's report", lambda: bool(line.search(log.read_text())),
             REPORT + 40, step=lambda: time.sleep(0.5))
    assert proc.poll() is None
    reported = int(line.findall(log.read_text())[0])
    assert REPORT <= reported < REPORT + 3

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=GRACE + 20)
    except Exception:
        pytest.fail(f"SIGTERM did not end the process in {GRACE + 20}s:\n"
                    + log.read_text()[-2000:])
    took = time.monotonic() - started
    out = log.read_text()
    assert took <= GRACE + 2, f"took {took:.1f}s to exit after SIGTERM"
    assert rc == EXIT_NOT_STOPPED, out[-2000:]
    assert re.search(rf"not stopped 1\d s after the stop signal .*the handler for event "
                     rf"{events[0].id} .*exiting without committing its batch", out), out
    assert "database unavailable" not in out
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    # nothing of the batch was committed, neither its effects nor its offsets
    assert counters(counter_table) == {}
    assert inbox_ids(counter_table, group) == set()
    assert committed_offsets(kafka_bootstrap, group) == {}


def test_a_handler_slower_than_the_idle_transaction_timeout_is_not_called_an_outage(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,  # noqa: F811
    new_topic: Callable[..., str], runners: list[ConsumerRunner],  # noqa: F811
    caplog: pytest.LogCaptureFixture, client: str,  # noqa: F811
) -> None:
    topic = new_topic(1)
    events = make_events(topic, 4, keys=1)
    produce_events(kafka_bootstrap, topic, events)
    slow_once: list[uuid.UUID] = []

    class SlowOnce(IdempotentConsumer):
        topics = (topic,)
        group_id = "slow"

        def handle(self, event: Event, session: Session) -> None:
            bump(session, event)
            if event.payload["i"] == 1 and not slow_once:
                slow_once.append(event.id)
                time.sleep(2.2)  # idle in the batch's transaction past the timeout

    runner = make_runner(runners, SlowOnce(), db_url, kafka_bootstrap, idle_tx_timeout=1.0,
                         client=client)
    caplog.set_level(logging.WARNING, logger="outbox.consumer")
    # run() turns the failed batch into a warning and retries; run_once shows the raise
    with pytest.raises(Exception, match=(
            rf"the handler for event {events[1].id} \({re.escape(topic)}\[0\] offset 1\) "
            r"ran \d s, longer than the database's idle_in_transaction_session_timeout "
            r"\(1 s\)")) as raised:
        run_until(runner, lambda: False, "the slow batch to fail", timeout=30)
    assert "database unavailable" not in str(raised.value)
    assert runner.healthy()  # the database is fine
    run_until(runner, lambda: runner.stats.processed == 4, "the batch retried")
    assert set(counters(counter_table).values()) == {1}
