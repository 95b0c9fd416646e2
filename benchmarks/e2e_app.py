"""The consumer `make bench`'s end-to-end figure runs as `outbox consume`: it notes when
each event's effect is applied. Its topic and group come from the environment, as a
deployed consumer's settings would."""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Event, IdempotentConsumer

DDL = "CREATE TABLE bench_applied (event_id uuid PRIMARY KEY, applied_at timestamptz NOT NULL)"
_APPLY = sa.text("INSERT INTO bench_applied (event_id, applied_at) "
                 "VALUES (:id, clock_timestamp())")


class Applied(IdempotentConsumer):
    """One row per event, stamped with the database's clock when the handler writes it."""

    topics = [os.environ.get("BENCH_E2E_TOPIC", "bench-e2e")]
    group_id = os.environ.get("BENCH_E2E_GROUP", "bench-e2e")

    def handle(self, event: Event, session: Session) -> None:
        session.execute(_APPLY, {"id": event.id})
