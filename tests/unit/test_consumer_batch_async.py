"""handle_batch, AsyncIdempotentConsumer, and handler_timeout, on the real loop with the
in-memory broker and SQLite (aiosqlite for the async consumer)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from outbox import AsyncIdempotentConsumer, Event, IdempotentConsumer
from outbox.consumer import HandlerMisuse, TopicPartition, idempotent_consumer
from outbox.consumer.calls import HandlerCalls, Running
from outbox.consumer.source import SourceRecord
from outbox.consumer.watchdog import EXIT_HANDLER_TIMEOUT, EXIT_NOT_STOPPED, Watchdog
from outbox.errors import ConfigError
from tests.unit.consumer_kit import (
    BUMP,
    Kit,
    attempts,
    bump,
    counters,
    events,
    inbox_ids,
    kit,  # noqa: F401  (fixture)
    run_until,
)

T0, T1 = TopicPartition("t", 0), TopicPartition("t", 1)


class Batched(IdempotentConsumer):
    topics = ["t"]
    group_id = "g"
    max_attempts = 2
    retry_backoff = 0.01

    def __init__(self, bad: set[uuid.UUID] | None = None) -> None:
        self.bad = bad or set()
        self.batches: list[list[int]] = []

    def handle_batch(self, events: list[Event], session: Session) -> None:
        self.batches.append([e.payload["i"] for e in events])
        for e in events:
            if e.id in self.bad:
                raise ValueError(f"bad {e.payload['i']}")
            bump(session, e)


def test_handle_batch_gets_the_new_events_in_partition_order_in_one_call(
    kit: Kit  # noqa: F811
) -> None:
    kit.broker.create_topic("t", partitions=2)
    evs = events("t", 8, keys=1)
    for e in evs[:4]:
        kit.broker.produce_event(e, partition=0)
    for e in evs[4:]:
        kit.broker.produce_event(e, partition=1)
    kit.broker.produce_event(evs[0], partition=1)  # a duplicate
    c = Batched()
    assert c.batched
    runner = kit.runner(c)
    run_until(runner, lambda: runner.stats.processed == 8 and runner.stats.duplicates == 1)
    assert c.batches == [[0, 1, 2, 3, 4, 5, 6, 7]]  # one call, duplicates removed
    assert set(counters(kit.url).values()) == {1}


def test_a_failing_batch_is_redone_event_by_event_so_only_the_culprit_is_retried(
    kit: Kit  # noqa: F811
) -> None:
    kit.broker.create_topic("t", partitions=2)
    evs = events("t", 6, keys=1)
    for e in evs[:3]:
        kit.broker.produce_event(e, partition=0)
    for e in evs[3:]:
        kit.broker.produce_event(e, partition=1)
    c = Batched(bad={evs[1].id})
    runner = kit.runner(c)
    run_until(runner, lambda: runner.stats.dead_lettered == 1 and runner.stats.processed == 5)
    assert c.batches[0] == [0, 1, 2, 3, 4, 5]
    # the redo: one event per call; after evs[1] fails, its partition waits, the rest
    # commits; its retry fails again, and it is dead-lettered on its own
    assert [0] in c.batches and [1] in c.batches and [3] in c.batches
    assert inbox_ids(kit.url, "g") == {e.id for e in evs}  # the dead one recorded too
    assert set(counters(kit.url)) == {e.id for e in evs} - {evs[1].id}
    [dead] = kit.broker.records("t.dlq")
    assert dict(dead.headers)["outbox_error"] == b"ValueError: bad 1"
    assert attempts(kit.url, "g") == {}


def test_handle_batch_and_external_mode_do_not_mix() -> None:
    class Both(Batched):
        external = True

    with pytest.raises(ConfigError, match=r"handle_batch .* external"):
        Both().validate()


# -- async ---------------------------------------------------------------------------

class AsyncCounter(AsyncIdempotentConsumer):
    topics = ["t"]
    group_id = "g"
    max_attempts = 2
    retry_backoff = 0.01

    def __init__(self, hang: set[uuid.UUID] | None = None) -> None:
        self.hang = hang or set()
        self.calls: list[int] = []

    async def handle(self, event: Event, session: AsyncSession) -> None:
        assert isinstance(session, AsyncSession)
        self.calls.append(event.payload["i"])
        if event.id in self.hang:
            await asyncio.sleep(30)
        await session.execute(BUMP, {"id": str(event.id), "k": event.key})


def test_an_async_consumer_applies_each_event_once_on_an_async_session(
    kit: Kit  # noqa: F811
) -> None:
    kit.broker.create_topic("t", partitions=2)
    evs = events("t", 10, keys=3)
    for e in evs + evs[:3]:
        kit.broker.produce_event(e)
    runner = kit.runner(AsyncCounter())
    run_until(runner, lambda: runner.stats.processed == 10 and runner.stats.duplicates == 3)
    assert counters(kit.url) == {e.id: 1 for e in evs}
    assert inbox_ids(kit.url, "g") == {e.id for e in evs}


def test_an_async_handler_past_handler_timeout_is_cancelled_and_counts_as_an_attempt(
    kit: Kit  # noqa: F811
) -> None:
    kit.broker.create_topic("t", partitions=1)
    evs = events("t", 3, keys=1)
    for e in evs:
        kit.broker.produce_event(e)
    c = AsyncCounter(hang={evs[1].id})
    runner = kit.runner(c, handler_timeout=0.2)
    run_until(runner, lambda: runner.stats.dead_lettered == 1 and runner.stats.processed == 2)
    assert c.calls.count(1) == 2 and runner.stats.failed == 2
    [dead] = kit.broker.records("t.dlq")
    assert dict(dead.headers)["outbox_error"].startswith(
        b"HandlerTimeout: the handler ran longer than handler_timeout (0.2 s)")


def test_async_handle_batch_and_the_async_decorator(kit: Kit) -> None:  # noqa: F811
    kit.broker.create_topic("t", partitions=1)
    evs = events("t", 4, keys=1)
    for e in evs:
        kit.broker.produce_event(e)
    seen: list[list[int]] = []

    class AsyncBatched(AsyncCounter):
        async def handle_batch(self, events: list[Event], session: AsyncSession) -> None:
            seen.append([e.payload["i"] for e in events])
            for e in events:
                await session.execute(BUMP, {"id": str(e.id), "k": e.key})

    runner = kit.runner(AsyncBatched())
    run_until(runner, lambda: runner.stats.processed == 4)
    assert seen == [[0, 1, 2, 3]]

    @idempotent_consumer(topics=["t"], group_id="g2")
    async def project(event: Event, session: AsyncSession) -> None:
        await session.execute(sa.text("UPDATE counter SET n = n + 10 WHERE event_id = :id"),
                              {"id": str(event.id)})

    assert isinstance(project, AsyncIdempotentConsumer)
    second = kit.runner(project)
    run_until(second, lambda: second.stats.processed == 4)
    assert set(counters(kit.url).values()) == {11}


def test_an_async_handler_that_commits_is_refused(kit: Kit) -> None:  # noqa: F811
    kit.broker.create_topic("t", partitions=1)
    kit.broker.produce_event(events("t", 1)[0])

    class Commits(AsyncCounter):
        async def handle(self, event: Event, session: AsyncSession) -> None:
            await super().handle(event, session)
            await session.commit()

    runner = kit.runner(Commits())
    with pytest.raises(HandlerMisuse, match=r"Commits\.handle called session\.commit\(\)"):
        run_until(runner, lambda: False)
    assert counters(kit.url) == {}


# -- the watchdog ----------------------------------------------------------------------

class _Calls:
    running: Running | None = None


def _running(n: int, started: float, is_async: bool = False) -> Running:
    evs = events("t", n, keys=1)
    return Running(evs, SourceRecord("t", 0, 5, b"k", b"v"), started, is_async)


def make_watchdog(**kw: Any) -> tuple[Watchdog, _Calls, list[Any], list[int]]:
    calls, timed_out, exits = _Calls(), [], []
    wd = Watchdog("g", calls, report_interval=10, shutdown_grace=10,  # type: ignore[arg-type]
                  handler_timeout=kw.pop("handler_timeout", 30.0),
                  on_timeout=lambda running, error: timed_out.append((running, error)),
                  exit=exits.append)
    return wd, calls, timed_out, exits


def test_the_watchdog_counts_a_handler_past_handler_timeout_and_exits(
    caplog: pytest.LogCaptureFixture
) -> None:
    wd, calls, timed_out, exits = make_watchdog()
    calls.running = running = _running(1, started=time.monotonic())
    assert not wd.overdue()
    running.started = time.monotonic() - 31
    assert wd.overdue()  # past handler_timeout: the health check is red
    running.started = 100.0
    wd.check(115.0)
    assert exits == [] and "has been running 15 s" in caplog.text
    wd.check(129.9)
    assert exits == []
    wd.check(130.0)
    assert exits == [EXIT_HANDLER_TIMEOUT]
    assert timed_out == [(running, "HandlerTimeout: the handler ran longer than "
                                   "handler_timeout (30 s)")]
    assert "counted as a failed attempt" in caplog.text


def test_the_watchdog_gives_an_async_handler_time_to_be_cancelled_first() -> None:
    wd, calls, _, exits = make_watchdog()
    calls.running = _running(1, started=0.0, is_async=True)
    wd.check(31.0)
    assert exits == []
    wd.check(36.0)
    assert exits == [EXIT_HANDLER_TIMEOUT]


def test_the_watchdog_ends_a_process_not_stopped_within_the_grace() -> None:
    wd, calls, _, exits = make_watchdog(handler_timeout=None)
    calls.running = _running(1, started=0.0)
    wd.signalled_at = 1000.0
    wd.check(1009.0)
    assert exits == []
    wd.check(1010.0)
    assert exits == [EXIT_NOT_STOPPED]


def test_a_handler_past_handler_timeout_is_one_durable_attempt_and_a_batch_marks_suspects(
    kit: Kit  # noqa: F811
) -> None:
    """What the watchdog records before it ends the process: one attempt for a single
    event (so max_attempts timeouts dead-letter it after restarts); for a batch call,
    suspects that make the next run call the handler one event at a time."""
    kit.broker.create_topic("t", partitions=1)
    evs = events("t", 3, keys=1)
    runner = kit.runner(Batched())
    one = _running(1, 0.0)
    runner._timed_out(one, "HandlerTimeout: x")
    single = one.event_id
    assert attempts(kit.url, "g") == {single: 1}
    batch = Running(evs, SourceRecord("t", 0, 0, b"k", b"v"), 0.0)
    runner._timed_out(batch, "HandlerTimeout: y")
    assert attempts(kit.url, "g") == {single: 1, **{e.id: 0 for e in evs}}
    for e in evs:
        kit.broker.produce_event(e)
    run_until(runner, lambda: runner.stats.processed == 3)
    assert runner.consumer.batches == [[0], [1], [2]]  # type: ignore[attr-defined]
    assert set(attempts(kit.url, "g")) == {single}  # the suspects are cleared


def test_handler_calls_report_the_running_call() -> None:
    c = HandlerCalls(Batched(), external=False, idle_tx_timeout=None, handler_timeout=None)
    assert c.batched and not c.is_async and c.running is None
    r = _running(2, 0.0)
    assert str(r).startswith(f"a batch of 2 events from event {r.event_id} (t[0] offset 5)")


def test_an_async_consumer_in_external_mode(kit: Kit) -> None:  # noqa: F811
    kit.broker.create_topic("t", partitions=1)
    evs = events("t", 3, keys=1)
    for e in evs + evs[:1]:
        kit.broker.produce_event(e)

    class Mailer(AsyncCounter):
        external = True

    c = Mailer()
    runner = kit.runner(c)
    run_until(runner, lambda: runner.stats.processed == 3 and runner.stats.duplicates == 1)
    assert c.calls == [0, 1, 2] and set(counters(kit.url).values()) == {1}
