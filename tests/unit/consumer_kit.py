"""Helpers for running the real consumer loop on the in-memory broker and SQLite."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Event, IdempotentConsumer
from outbox.consumer import ConsumerRunner
from outbox.schema import metadata
from outbox.serde import JsonSerializer
from outbox.testing import InMemoryBroker

COUNTER_DDL = "CREATE TABLE counter (event_id TEXT PRIMARY KEY, n INT NOT NULL, k TEXT)"
BUMP = sa.text("INSERT INTO counter (event_id, n, k) VALUES (:id, 1, :k) "
               "ON CONFLICT (event_id) DO UPDATE SET n = counter.n + 1")


def bump(session: Session, event: Event) -> None:
    session.execute(BUMP, {"id": str(event.id), "k": event.key})


def make_db(path: Path) -> str:
    url = f"sqlite:///{path / 'consumer.sqlite'}"
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as c:
        c.execute(sa.text(COUNTER_DDL))
    engine.dispose()
    return url


def events(topic: str, n: int, keys: int = 3, start: int = 0) -> list[Event]:
    json_ = JsonSerializer()
    return [Event(topic=topic, key=f"k{i % keys}", type="Counted", payload={"i": i},
                  data=json_.dumps({"i": i})) for i in range(start, start + n)]


def counters(url: str) -> dict[uuid.UUID, int]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return {uuid.UUID(r[0]): r[1] for r in c.execute(sa.text(
                "SELECT event_id, n FROM counter"))}
    finally:
        engine.dispose()


def rows(url: str, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return list(c.execute(sa.text(sql), params))
    finally:
        engine.dispose()


def inbox_ids(url: str, group: str) -> set[uuid.UUID]:
    return {uuid.UUID(hex=r[0]) for r in rows(
        url, "SELECT event_id FROM outbox_inbox WHERE consumer_group = :g", g=group)}


def attempts(url: str, group: str) -> dict[uuid.UUID, int]:
    return {uuid.UUID(hex=r[0]): r[1] for r in rows(
        url, "SELECT event_id, attempts FROM outbox_attempts WHERE consumer_group = :g",
        g=group)}


def run_until(runner: ConsumerRunner, predicate: Callable[[], bool], what: str = "it",
              timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}: {runner.stats}")
        runner.run_once(0.02)


class Counter(IdempotentConsumer):
    """Bumps the event's counter; `fail(event)` may raise to script failures."""

    retry_backoff = 0.01

    def __init__(self, topic: str = "t", group: str = "g", max_attempts: int = 3,
                 fail: Callable[[Event], None] | None = None) -> None:
        self.topics = [topic]
        self.group_id = group
        self.max_attempts = max_attempts
        self.fail = fail
        self.calls: list[Event] = []

    def handle(self, event: Event, session: Session) -> None:
        self.calls.append(event)
        if self.fail is not None:
            self.fail(event)
        bump(session, event)


class Kit:
    """A broker, a database and the runners a test made (closed afterwards)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.broker = InMemoryBroker()
        self.runners: list[ConsumerRunner] = []

    def runner(self, consumer: Any, group: str | None = None, **kw: Any) -> ConsumerRunner:
        group = group or consumer.group_id
        kw.setdefault("db_url", self.url)
        r = ConsumerRunner(consumer, source=self.broker.source(group),
                           dead_letters=kw.pop("dead_letters", None) or self.broker.publisher(),
                           **kw)
        self.runners.append(r)
        return r

    def close(self) -> None:
        for r in self.runners:
            r.close()


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[Kit]:
    k = Kit(make_db(tmp_path))
    yield k
    k.close()
