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


def _note_call(event: Event) -> None:
    """Append the event id to POISON_CALLS, durably: the test counts calls across
    processes it SIGKILLs."""
    path = os.environ.get("POISON_CALLS")
    if path:
        with open(path, "a") as f:
            f.write(f"{event.id}\n")
            f.flush()
            os.fsync(f.fileno())


class Poison(IdempotentConsumer):
    """Fails every event whose payload says `poison`; a long retry backoff, so a test can
    kill the process between two attempts."""

    topics = _topics()
    group_id = "poison"
    max_attempts = int(os.environ.get("POISON_MAX_ATTEMPTS", "3"))
    retry_backoff = float(os.environ.get("POISON_RETRY_BACKOFF", "60"))

    def handle(self, event: Event, session: Session) -> None:
        _note_call(event)
        if event.payload.get("poison"):
            raise RuntimeError("poison on purpose")
        bump(session, event)


class HangOnPoison(Poison):
    """Never returns on a poison event (a call without a timeout): `handler_timeout`."""

    def handle(self, event: Event, session: Session) -> None:
        _note_call(event)
        if event.payload.get("poison"):
            while True:
                time.sleep(3600)
        bump(session, event)
