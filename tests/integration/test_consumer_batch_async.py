"""handle_batch and AsyncIdempotentConsumer on the real PostgreSQL and Kafka, on both
clients: each event applied once, a failing event dead-lettered alone."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from outbox import AsyncIdempotentConsumer, Event, IdempotentConsumer
from outbox.consumer import ConsumerRunner
from tests.integration.consumer_app import _BUMP
from tests.integration.test_consumer import (
    client,  # noqa: F401  (fixture)
    counter_table,  # noqa: F401  (fixture)
    counters,
    inbox_ids,
    make_events,
    make_runner,
    produce_events,
    read_topic,
    run_until,
    runners,  # noqa: F401  (fixture)
)


def test_handle_batch_applies_each_event_once_and_dead_letters_the_culprit_alone(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,  # noqa: F811
    new_topic: Callable[..., str], runners: list[ConsumerRunner], client: str,  # noqa: F811
) -> None:
    topic = new_topic(3)
    events = make_events(topic, 200, keys=11)
    bad = events[57]
    produce_events(kafka_bootstrap, topic, events + events[:20])
    sizes: list[int] = []

    class Bulk(IdempotentConsumer):
        topics = (topic,)
        group_id = "bulk"
        max_attempts = 2
        retry_backoff = 0.05

        def handle_batch(self, batch: list[Event], session: Session) -> None:
            sizes.append(len(batch))
            if any(e.id == bad.id for e in batch):
                raise ValueError("one bad apple")
            session.execute(_BUMP, [{"id": e.id, "pid": 0} for e in batch])  # executemany

    runner = make_runner(runners, Bulk(), db_url, kafka_bootstrap, client=client)
    run_until(runner, lambda: runner.stats.processed == 199 and runner.stats.dead_lettered == 1
              and runner.stats.processed + runner.stats.duplicates + 1 >= 220, "all records")
    got = counters(counter_table)
    assert set(got) == {e.id for e in events} - {bad.id} and set(got.values()) == {1}
    assert max(sizes) > 1  # batches, not one call per event
    dead = read_topic(kafka_bootstrap, topic + ".dlq", expect=1)
    assert len(dead) == 1 and dead[0][1]["ce_id"] == str(bad.id).encode()
    assert inbox_ids(counter_table, "bulk") == {e.id for e in events}


def test_an_async_consumer_applies_each_event_once(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,  # noqa: F811
    new_topic: Callable[..., str], runners: list[ConsumerRunner], client: str,  # noqa: F811
) -> None:
    topic = new_topic(3)
    events = make_events(topic, 60, keys=7)
    bad = events[13]
    produce_events(kafka_bootstrap, topic, events + events[:10])

    class AsyncCounter(AsyncIdempotentConsumer):
        topics = (topic,)
        group_id = "async"
        max_attempts = 2
        retry_backoff = 0.05

        async def handle(self, event: Event, session: AsyncSession) -> None:
            assert isinstance(session, AsyncSession)
            if event.id == bad.id:
                raise RuntimeError("async boom")
            await session.execute(_BUMP, {"id": event.id, "pid": 0})

    runner = make_runner(runners, AsyncCounter(), db_url, kafka_bootstrap, client=client)
    run_until(runner, lambda: runner.stats.processed == 59 and runner.stats.dead_lettered == 1
              and runner.stats.duplicates == 10, "all records")
    got = counters(counter_table)
    assert set(got) == {e.id for e in events} - {bad.id} and set(got.values()) == {1}
    assert runner.stats.failed == 2
    dead = read_topic(kafka_bootstrap, topic + ".dlq", expect=1)
    assert dead[0][1]["outbox_error"] == b"RuntimeError: async boom"
