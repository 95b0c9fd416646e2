"""Consumers the integration tests run, in-process or as `outbox consume` subprocesses:

    COUNTER_TOPICS=t1 python -m outbox.cli consume tests.integration.consumer_app:Counter ...

The effect of handling an event is one bump of its row in the `counter` table, so
"applied exactly once" reads as "every counter is 1".
"""

from __future__ import annotations

import os
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Event, IdempotentConsumer
from outbox.consumer import consumer

COUNTER_DDL = ("CREATE TABLE IF NOT EXISTS counter (event_id uuid PRIMARY KEY, "
               "n int NOT NULL, pid int NOT NULL)")
_BUMP = sa.text("INSERT INTO counter (event_id, n, pid) VALUES (:id, 1, :pid) "
                "ON CONFLICT (event_id) DO UPDATE SET n = counter.n + 1")


def bump(session: Session, event: Event) -> None:
    session.execute(_BUMP, {"id": event.id, "pid": os.getpid()})


def _topics() -> list[str]:
    return [t for t in os.environ.get("COUNTER_TOPICS", "counter-unset").split(",") if t]


class Counter(IdempotentConsumer):
    """Bumps the event's counter; COUNTER_DELAY seconds of simulated work per event."""

    topics = _topics()
    group_id = "counter"

    def handle(self, event: Event, session: Session) -> None:
        delay = float(os.environ.get("COUNTER_DELAY") or 0)
        if delay:
            time.sleep(delay)
        bump(session, event)


@consumer(topics=_topics(), group_id="counter-fn")
def count(event: Event, session: Session) -> None:
    """The decorator form of Counter."""
    bump(session, event)


def not_a_consumer(event: Event, session: Session) -> None:
    """A plain function: `outbox consume` must refuse it with a clear message."""
