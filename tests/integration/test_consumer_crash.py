"""The crash point between the database commit and the offset commit
(`OUTBOX_FAULT_CRASH=consumer.after_commit:1`, outbox/_faults.py): the chaos harness
kills consumers in exactly that window, and the dedupe records make it harmless."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox._faults import EXIT_CODE
from tests.integration.test_consumer import (
    client,  # noqa: F401  (fixture)
    committed_offsets,
    counter_table,  # noqa: F401  (fixture)
    counters,
    inbox_ids,
    make_events,
    processes,  # noqa: F401  (fixture)
    produce_events,
    start_consumer,
    stop_process,
    wait_for,
)


def test_a_consumer_killed_after_its_database_commit_loses_nothing_and_applies_once(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,  # noqa: F811
    new_topic: Callable[..., str], processes: list,  # noqa: F811
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: str,  # noqa: F811
) -> None:
    topic = new_topic(1)
    group = f"crash-{uuid.uuid4().hex[:6]}"
    events = make_events(topic, 50, keys=5)
    produce_events(kafka_bootstrap, topic, events)

    monkeypatch.setenv("OUTBOX_FAULT_CRASH", "consumer.after_commit:1")
    crashing = start_consumer("tests.integration.consumer_app:Counter", db_url,
                              kafka_bootstrap, topic, group, tmp_path / "crash.log",
                              client=client)
    processes.append(crashing)
    assert crashing.wait(timeout=60) == EXIT_CODE
    assert "crash point consumer.after_commit reached" in (tmp_path / "crash.log").read_text()
    applied = counters(counter_table)
    assert applied and set(applied.values()) == {1}  # the batch's database commit happened
    assert committed_offsets(kafka_bootstrap, group) == {}  # its offset commit did not

    monkeypatch.delenv("OUTBOX_FAULT_CRASH")
    again = start_consumer("tests.integration.consumer_app:Counter", db_url, kafka_bootstrap,
                           topic, group, tmp_path / "again.log", client=client)
    processes.append(again)
    wait_for("every offset committed",
             lambda: sum(committed_offsets(kafka_bootstrap, group).values()) == 50, 60,
             step=lambda: time.sleep(0.5))
    rc, _ = stop_process(again)
    assert rc == 0
    got = counters(counter_table)
    assert set(got) == {e.id for e in events} and set(got.values()) == {1}
    assert inbox_ids(counter_table, group) == set(got)
