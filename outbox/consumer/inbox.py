"""The consumer's SQL: dedupe records (`<prefix>_inbox`) and attempts (`<prefix>_attempts`).

Every statement runs on the SQLAlchemy Connection of the caller's session, so it joins
the batch's transaction, and works the same under an AsyncSession (the runner runs the
batch in SQLAlchemy's greenlet bridge). On PostgreSQL the statements are hand-written
SQL, sent as they are (`exec_driver_sql`): the hot path is one `claim` per batch. The
same methods on other databases (SQLite, for unit tests) go through SQLAlchemy Core.

A row of `<prefix>_attempts` counts a consumer group's failed handler calls for one
event, so `max_attempts` holds across restarts and rebalances. It lives only while the
event is retried: a success or a dead letter deletes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from outbox.schema import Tables

MAX_ERROR = 2000


@dataclass(frozen=True, slots=True)
class Prior:
    """What earlier runs left of an event: failed attempts, and the last error."""

    attempts: int
    error: str | None


class PostgresInbox:
    """The consumer's statements on PostgreSQL (psycopg 3, sync or async)."""

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        ib, at = tables.inbox.name, tables.attempts.name
        # The INSERT takes the ids sorted: two consumers claiming overlapping ids lock
        # them in one order. A concurrent claim of the same id waits for the other
        # transaction, then finds the id processed (it committed) or claims it (it rolled
        # back). Only the exceptions come back: the ids that were processed before
        # (`new` false) and the new ones that earlier attempts left a record of. In the
        # common batch neither exists, so nothing crosses the wire but the ids once.
        self._claim = (
            f"WITH claimed AS (INSERT INTO {ib} (consumer_group, event_id, processed_at) "
            "SELECT %(group)s, id, now() FROM unnest(%(ids)b::uuid[]) AS u(id) ORDER BY id "
            "ON CONFLICT DO NOTHING RETURNING event_id) "
            "SELECT false, u.id, 0, NULL FROM unnest(%(ids)b::uuid[]) AS u(id) "
            "WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.event_id = u.id) "
            "UNION ALL "
            "SELECT true, c.event_id, a.attempts, a.last_error FROM claimed c "
            f"JOIN {at} a ON a.consumer_group = %(group)s AND a.event_id = c.event_id")
        self._unclaim = (f"DELETE FROM {ib} WHERE consumer_group = %(group)s "
                         "AND event_id = ANY(%(ids)b::uuid[])")
        self._seen = (f"SELECT event_id FROM {ib} WHERE consumer_group = %(group)s "
                      "AND event_id = ANY(%(ids)b::uuid[])")
        self._priors = (f"SELECT event_id, attempts, last_error FROM {at} "
                        "WHERE consumer_group = %(group)s AND event_id = ANY(%(ids)b::uuid[])")
        self._mark = (f"INSERT INTO {ib} (consumer_group, event_id, processed_at) "
                      "SELECT %(group)s, id, now() FROM unnest(%(ids)b::uuid[]) AS u(id) "
                      "ORDER BY id ON CONFLICT DO NOTHING RETURNING event_id")
        self._attempt = (
            f"INSERT INTO {at} AS a (consumer_group, event_id, attempts, last_error, "
            "updated_at) VALUES (%(group)s, %(id)s, %(n)s, %(error)s, now()) "
            "ON CONFLICT (consumer_group, event_id) DO UPDATE SET "
            "attempts = a.attempts + %(n)s, last_error = EXCLUDED.last_error, "
            "updated_at = now() RETURNING attempts")
        self._forget = (f"DELETE FROM {at} WHERE consumer_group = %(group)s "
                        "AND event_id = ANY(%(ids)b::uuid[])")
        self._purge = {
            name: f"DELETE FROM {t} WHERE consumer_group = %(group)s AND event_id IN ("
                  f"SELECT event_id FROM {t} WHERE consumer_group = %(group)s "
                  f"AND {col} < now() - %(age)s LIMIT %(limit)s)"
            for name, t, col in (("inbox", ib, "processed_at"), ("attempts", at, "updated_at"))}

    @staticmethod
    def _ids(ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        return sorted(set(ids))

    def claim(self, conn: sa.Connection, group: str, ids: Sequence[uuid.UUID]
              ) -> dict[uuid.UUID, Prior | None]:
        """Insert the batch's dedupe records in one statement: the ids returned are new
        (with what earlier attempts left, if anything); the others were processed."""
        rows = conn.exec_driver_sql(self._claim, {"group": group, "ids": list(ids)})
        seen: set[uuid.UUID] = set()
        priors: dict[uuid.UUID, Prior] = {}
        for new, event_id, attempts, error in rows:
            if new:
                priors[event_id] = Prior(attempts, error)
            else:
                seen.add(event_id)
        return {i: priors.get(i) for i in ids if i not in seen}

    def unclaim(self, conn: sa.Connection, group: str, ids: Sequence[uuid.UUID]) -> None:
        """Remove the dedupe records of events the batch did not finish."""
        conn.exec_driver_sql(self._unclaim, {"group": group, "ids": self._ids(ids)})

    def processed(self, conn: sa.Connection, group: str, ids: Sequence[uuid.UUID]
                  ) -> set[uuid.UUID]:
        rows = conn.exec_driver_sql(self._seen, {"group": group, "ids": self._ids(ids)})
        return {r[0] for r in rows}

    def priors(self, conn: sa.Connection, group: str, ids: Sequence[uuid.UUID]
               ) -> dict[uuid.UUID, Prior]:
        rows = conn.exec_driver_sql(self._priors, {"group": group, "ids": self._ids(ids)})
        return {r[0]: Prior(r[1], r[2]) for r in rows}

    def mark_processed(self, conn: sa.Connection, group: str, ids: Sequence[uuid.UUID]
                       ) -> set[uuid.UUID]:
        """Insert dedupe records; returns the ids that were not processed before."""
        rows = conn.exec_driver_sql(self._mark, {"group": group, "ids": self._ids(ids)})
        return {r[0] for r in rows}

    def record_attempt(self, conn: sa.Connection, group: str, event_id: uuid.UUID,
                       error: str, count: int = 1) -> int:
        """One more failed attempt (`count` 0: only note the error); returns the total."""
        row = conn.exec_driver_sql(self._attempt, {
            "group": group, "id": event_id, "n": count, "error": error[:MAX_ERROR]}).first()
        return int(row[0]) if row else 0

    def forget_attempts(self, conn: sa.Connection, group: str,
                        ids: Sequence[uuid.UUID]) -> None:
        conn.exec_driver_sql(self._forget, {"group": group, "ids": self._ids(ids)})

    def purge(self, conn: sa.Connection, group: str, age_seconds: float, limit: int,
              table: str = "inbox") -> int:
        """Delete at most `limit` of the group's rows older than `age_seconds`."""
        return conn.exec_driver_sql(self._purge[table], {
            "group": group, "age": timedelta(seconds=age_seconds), "limit": limit}).rowcount


class CoreInbox:
    """The same statements through SQLAlchemy Core, for SQLite (unit tests)."""

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self.ib, self.at = tables.inbox, tables.attempts

    @staticmethod
    def _now() -> datetime:
        return datetime.now(UTC)

    def claim(self, conn: sa.Connection, group: str, ids: Sequence[uuid.UUID]
              ) -> dict[uuid.UUID, Prior | None]:
        new = self.mark_processed(conn, group, ids)
        priors = self.priors(conn, group, list(new))
        return {i: priors.get(i) for i in new}

    def unclaim(self, conn: sa.Connection, group: str, ids: Sequence[uuid.UUID]) -> None:
        ib = self.ib
        conn.execute(sa.delete(ib).where(ib.c.consumer_group == group,
                                         ib.c.event_id.in_(list(ids))))

    def processed(self, conn: sa.Connection, group: str, ids: Sequence[uuid.UUID]
                  ) -> set[uuid.UUID]:
        ib = self.ib
        return set(conn.scalars(sa.select(ib.c.event_id).where(
            ib.c.consumer_group == group, ib.c.event_id.in_(list(ids)))))

    def priors(self, conn: sa.Connection, group: str, ids: Sequence[uuid.UUID]
               ) -> dict[uuid.UUID, Prior]:
        at = self.at
        rows = conn.execute(sa.select(at.c.event_id, at.c.attempts, at.c.last_error).where(
            at.c.consumer_group == group, at.c.event_id.in_(list(ids))))
        return {r[0]: Prior(r[1], r[2]) for r in rows}

    def mark_processed(self, conn: sa.Connection, group: str, ids: Sequence[uuid.UUID]
                       ) -> set[uuid.UUID]:
        ids = sorted(set(ids))
        if not ids:
            return set()
        now = self._now()
        stmt = sqlite.insert(self.ib).values(
            [{"consumer_group": group, "event_id": i, "processed_at": now} for i in ids]
        ).on_conflict_do_nothing().returning(self.ib.c.event_id)
        return set(conn.scalars(stmt))

    def record_attempt(self, conn: sa.Connection, group: str, event_id: uuid.UUID,
                       error: str, count: int = 1) -> int:
        at = self.at
        stmt = sqlite.insert(at).values(
            consumer_group=group, event_id=event_id, attempts=count,
            last_error=error[:MAX_ERROR], updated_at=self._now())
        upsert = stmt.on_conflict_do_update(
            index_elements=[at.c.consumer_group, at.c.event_id],
            set_={"attempts": at.c.attempts + count, "last_error": stmt.excluded.last_error,
                  "updated_at": stmt.excluded.updated_at}).returning(at.c.attempts)
        return int(conn.scalar(upsert) or 0)

    def forget_attempts(self, conn: sa.Connection, group: str,
                        ids: Sequence[uuid.UUID]) -> None:
        at = self.at
        conn.execute(sa.delete(at).where(at.c.consumer_group == group,
                                         at.c.event_id.in_(list(ids))))

    def purge(self, conn: sa.Connection, group: str, age_seconds: float, limit: int,
              table: str = "inbox") -> int:
        t = self.ib if table == "inbox" else self.at
        col = t.c.processed_at if table == "inbox" else t.c.updated_at
        cutoff = self._now() - timedelta(seconds=age_seconds)
        old = sa.select(t.c.event_id).where(t.c.consumer_group == group,
                                            col < cutoff).limit(limit)
        return conn.execute(sa.delete(t).where(t.c.consumer_group == group,
                                               t.c.event_id.in_(old))).rowcount


Inbox = PostgresInbox | CoreInbox


def inbox_for(dialect: str, tables: Tables) -> Any:
    """The statements for a database dialect ("postgresql", else Core)."""
    return PostgresInbox(tables) if dialect == "postgresql" else CoreInbox(tables)
