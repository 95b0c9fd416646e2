"""A handler that commits (or rolls back) the runner's session: caught before anything of
the batch is committed, and the batch rolls back whole.

The choice (documented in outbox/consumer/calls.py): such a handler is a programming error,
not a bad event, so the runner stops with HandlerMisuse instead of dead-lettering
every event it touches. Nothing of the batch is committed, neither in the database nor
in Kafka; a fixed handler then applies every event of the batch exactly once.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Event, IdempotentConsumer
from outbox.consumer import ConsumerRunner, HandlerMisuse
from tests.integration.consumer_app import bump
from tests.integration.test_consumer import (
    committed_offsets,
    counter_table,  # noqa: F401  (fixture)
    counters,
    inbox_ids,
    make_events,
    make_runner,
    produce_events,
    run_until,
    runners,  # noqa: F401  (fixture)
    start_consumer,
)

Misuse = Callable[[Session], None]


def attempts_in(engine: sa.Engine, group: str) -> dict[uuid.UUID, int]:
    """The group's failed attempts per event, as committed in outbox_attempts."""
    with engine.connect() as c:
        return {r[0]: r[1] for r in c.execute(sa.text(
            "SELECT event_id, attempts FROM outbox_attempts WHERE consumer_group = :g"),
            {"g": group})}


def _commit(session: Session) -> None:
    session.commit()


def _commit_and_swallow(session: Session) -> None:
    with contextlib.suppress(Exception):  # hiding the refusal does not help
        session.commit()


def _rollback(session: Session) -> None:
    session.rollback()


def _close(session: Session) -> None:
    session.close()


def _commit_inside_own_savepoint(session: Session) -> None:
    with session.begin_nested():
        session.commit()


class Misbehaving(IdempotentConsumer):
    """Bumps the counter; misbehaves on the event whose `i` is `bad_at`.

    For the savepoint path: `fail_at` raises on that event (a bad event, on every call),
    and with `misuse_in_savepoint` the misuse happens only while the runner's savepoint
    is open, so the fast path gets past `bad_at` and fails at `fail_at`, and the misuse
    then happens in the savepoint redo. `calls` notes (i, inside a savepoint) per call."""

    def __init__(self, topic: str, group: str, misuse: Misuse | None, bad_at: int = 6,
                 external: bool = False, fail_at: int | None = None,
                 misuse_in_savepoint: bool = False) -> None:
        self.topics = [topic]
        self.group_id = group
        self.misuse, self.bad_at = misuse, bad_at
        self.external = external
        self.fail_at, self.misuse_in_savepoint = fail_at, misuse_in_savepoint
        self.calls: list[tuple[int, bool]] = []

    def handle(self, event: Event, session: Session) -> None:
        i, nested = event.payload["i"], session.in_nested_transaction()
        self.calls.append((i, nested))
        bump(session, event)
        if i == self.fail_at:
            raise ValueError("a bad event, on purpose")
        if self.misuse is not None and i == self.bad_at and (
                nested or not self.misuse_in_savepoint):
            self.misuse(session)


@pytest.mark.parametrize("misuse", [_commit, _commit_and_swallow, _rollback, _close,
                                    _commit_inside_own_savepoint])
@pytest.mark.parametrize("path", ["fast", "savepoints", "external"])
def test_a_handler_that_ends_the_runners_transaction_commits_nothing_of_the_batch(
    misuse: Misuse, path: str, counter_table: sa.Engine, db_url: str,  # noqa: F811
    kafka_bootstrap: str, new_topic: Callable[..., str],
    runners: list[ConsumerRunner],  # noqa: F811
) -> None:
    topic = new_topic(1)
    group = f"misuse-{uuid.uuid4().hex[:6]}"
    events = make_events(topic, 10, keys=1)
    produce_events(kafka_bootstrap, topic, events)
    # The savepoint path: a handler that raises on the fast path (event 7) makes the
    # batch redo with a savepoint per event (outbox/consumer/applier.py). A malformed
    # record no longer does: it ends its partition's part of the batch before it, and the
    # events before it commit on the fast path. The misuse at event 6 then happens
    # inside the runner's savepoint, in the redo, before the redo reaches event 7.
    savepoints = path == "savepoints"
    bad = Misbehaving(topic, group, misuse, external=path == "external",
                      fail_at=7 if savepoints else None, misuse_in_savepoint=savepoints)
    runner = make_runner(runners, bad, db_url, kafka_bootstrap, max_poll_records=10)
    with pytest.raises(HandlerMisuse, match=r"Misbehaving\.handle .*event "
                       + str(events[6].id)):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # polls until the batch arrives
            runner.run_once(0.2)
    runner.close()
    if savepoints:  # the fast path got to event 7; the redo, in savepoints, to event 6
        assert bad.calls == [(i, False) for i in range(8)] + [(i, True) for i in range(7)]

    # One transaction for the batch: none of it is done. On the savepoint path too, the
    # guarantee the rebuild keeps: the misused transaction commits nothing of the batch,
    # not the events before the misuse (released savepoints are part of it), and not
    # event 7's failed attempt either. External mode has one transaction per event:
    # the events before the bad one are done for good (dedupe records and effects
    # together); the bad one and everything after it left no trace.
    done = {e.id for e in events[:6]} if path == "external" else set()
    assert inbox_ids(counter_table, group) == done
    assert set(counters(counter_table)) == done
    # no offset of the aborted batch is committed (in external mode, the dedupe records
    # of the events done skip their redelivery)
    assert committed_offsets(kafka_bootstrap, group) == {}
    assert attempts_in(counter_table, group) == {}

    # The handler fixed, the same group applies every event of the batch exactly once.
    good = Misbehaving(topic, group, None, external=path == "external")
    again = make_runner(runners, good, db_url, kafka_bootstrap, max_poll_records=10)
    run_until(again, lambda: again.stats.processed == 10 - len(done),
              "the rest of the batch applied", timeout=60)
    got = counters(counter_table)
    assert set(got) == {e.id for e in events} and set(got.values()) == {1}
    assert inbox_ids(counter_table, group) == {e.id for e in events}


def test_savepoints_and_flushes_of_the_handlers_own_are_not_misuse(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,  # noqa: F811
    new_topic: Callable[..., str], runners: list[ConsumerRunner],  # noqa: F811
) -> None:
    topic = new_topic(1)
    events = make_events(topic, 6, keys=1)
    produce_events(kafka_bootstrap, topic, events)

    class Careful(IdempotentConsumer):
        topics = (topic,)
        group_id = "careful"

        def handle(self, event: Event, session: Session) -> None:
            session.flush()
            with session.begin_nested():
                bump(session, event)
            try:  # a savepoint of its own that it rolls back
                with session.begin_nested():
                    bump(session, event)
                    raise LookupError("undone")
            except LookupError:
                pass

    runner = make_runner(runners, Careful(), db_url, kafka_bootstrap)
    run_until(runner, lambda: runner.stats.processed == 6, "6 events applied")
    assert set(counters(counter_table).values()) == {1}
    assert runner.stats.failed == 0


def test_outbox_consume_stops_on_a_committing_handler_with_one_clear_line(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,  # noqa: F811
    new_topic: Callable[..., str], tmp_path: Path,
) -> None:
    topic = new_topic(1)
    group = f"commits-{uuid.uuid4().hex[:6]}"
    events = make_events(topic, 5, keys=1)
    produce_events(kafka_bootstrap, topic, events)
    log = tmp_path / "commits.log"
    proc = start_consumer("tests.integration.misbehaving_app:Commits", db_url,
                          kafka_bootstrap, topic, group, log)
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert rc == 1, out[-3000:]
    assert f"Error: Commits.handle called session.commit() on event {events[0].id}" in out
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    assert counters(counter_table) == {} and inbox_ids(counter_table, group) == set()
    assert committed_offsets(kafka_bootstrap, group) == {}
