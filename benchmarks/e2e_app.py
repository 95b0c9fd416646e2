"""The consumers `make bench`'s end-to-end figure runs as `outbox consume`: they note
when each event's effect is written (`clock_timestamp()`, the column's default). Their
topic and group come from the environment, as a deployed consumer's settings would."""

from __future__ import annotations

import os
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox import Event, IdempotentConsumer

DDL = ("CREATE TABLE bench_applied (event_id uuid PRIMARY KEY, "
       "applied_at timestamptz NOT NULL DEFAULT clock_timestamp())")
_APPLY = sa.text("INSERT INTO bench_applied (event_id) VALUES (:id)")


class _Base(DeclarativeBase):
    pass


class AppliedRow(_Base):
    __tablename__ = "bench_applied"
    event_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)


class Applied(IdempotentConsumer):
    """One row per event, one statement per event (`session.execute`)."""

    topics = [os.environ.get("BENCH_E2E_TOPIC", "bench-e2e")]
    group_id = os.environ.get("BENCH_E2E_GROUP", "bench-e2e")

    def handle(self, event: Event, session: Session) -> None:
        session.execute(_APPLY, {"id": event.id})


class AppliedOrm(Applied):
    """One row per event the ORM way (`session.add`): the batch's rows are inserted
    together when the runner commits, so the stamp is close to the commit."""

    def handle(self, event: Event, session: Session) -> None:
        session.add(AppliedRow(event_id=event.id))
