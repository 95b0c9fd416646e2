"""Handlers that misbehave, for tests that run them as `outbox consume` processes:

    COUNTER_TOPICS=t1 python -m outbox.cli consume tests.integration.misbehaving_app:Hang ...

Each bumps the event's counter first (tests/integration/consumer_app.py), so a test
can tell whether anything of the batch was committed.
"""

from __future__ import annotations

import os
import time

from sqlalchemy.orm import Session

from outbox import Event, IdempotentConsumer
from tests.integration.consumer_app import bump


def _topics() -> list[str]:
    return [t for t in os.environ.get("COUNTER_TOPICS", "counter-unset").split(",") if t]


class Hang(IdempotentConsumer):
    """Never returns: a call to a service without a timeout, say."""

    topics = _topics()
    group_id = "hang"

    def handle(self, event: Event, session: Session) -> None:
        bump(session, event)
        while True:
            time.sleep(3600)


class Commits(IdempotentConsumer):
    """Commits the session the runner gave it (HandlerMisuse)."""

    topics = _topics()
    group_id = "commits"

    def handle(self, event: Event, session: Session) -> None:
        bump(session, event)
        session.commit()
