"""The batch applier: one poll batch, one database transaction.

1. One statement claims the batch's event ids (`<prefix>_inbox`, ON CONFLICT DO
   NOTHING): the ids it returns are new, with the attempts earlier runs left; the rest
   were processed before and are skipped. Deduplication costs one round trip per batch.
2. Each partition's records, in offset order: a new event goes to the handler. One
   that used up its `max_attempts`, or a record that is not an event (malformed), is
   set aside for the dead-letter topic; its partition stops there for this batch (the
   runner sends the copy after the commit, then the partition goes on from the next
   record). The other partitions go on: a malformed record costs no savepoints. A
   `handle_batch` consumer gets all new events in one call.
3. The fast path runs without savepoints (they cost three round trips per event). If a
   handler raises, that transaction rolls back whole and the batch is redone with a
   savepoint per event, so the failure rolls back only its own event and counts as its
   attempt (in `<prefix>_attempts`, committed with the batch). An event with attempts
   left holds its partition back; its later records wait.
4. Dedupe records of events the batch did not finish are deleted, and the transaction
   commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, SessionTransaction

from outbox import tracing
from outbox.backoff import first_line
from outbox.consumer.calls import HandlerCalls, HandlerMisuse
from outbox.consumer.deadletter import REASON_FAILED, REASON_MALFORMED
from outbox.consumer.inbox import Prior
from outbox.consumer.outcome import BatchFailed, DeadLetter, Outcome, Parts, Retries
from outbox.consumer.source import Record, TopicPartition
from outbox.errors import MalformedRecord
from outbox.event import Event

Sessions = Callable[[], AbstractContextManager[Session]]
Failure = tuple[TopicPartition, int, Exception]


class NeedSavepoints(Exception):
    """A handler failed on the fast path: redo the batch with a savepoint per event.
    Carries the failure, when it is one event's, so the redo counts it as that event's
    attempt instead of calling the handler once more."""

    def __init__(self, failure: Failure | None = None) -> None:
        super().__init__()
        self.failure = failure


class Applier:
    """What both appliers work with: the group, its inbox, sessions, handler calls and
    retries, and whether the runner is stopping or deduplicating."""

    def __init__(self, *, group: str, inbox: Any, sessions: Sessions, calls: HandlerCalls,
                 retries: Retries, stopping: Callable[[], bool],
                 dedupe: Callable[[], bool]) -> None:
        self.group = group
        self.inbox = inbox
        self.sessions = sessions
        self.calls = calls
        self.retries = retries
        self.stopping = stopping
        self.dedupe = dedupe


class BatchApplier(Applier):
    """Applies batches in one transaction each (not for `external` consumers)."""

    def apply(self, parts: Parts) -> Outcome:
        """The fast path first; the savepoint redo if a handler failed on it."""
        try:
            return self._run(parts, savepoints=False)
        except NeedSavepoints as exc:
            return self._run(parts, savepoints=True, failure=exc.failure)

    def _run(self, parts: Parts, savepoints: bool, failure: Failure | None = None) -> Outcome:
        spans = tracing.Spans(self.group)
        committed = False
        try:
            with self.sessions() as session, session.begin():
                out = _Batch(self, session, savepoints, failure, spans).walk(parts)
            committed = True
            return out
        except (BatchFailed, HandlerMisuse, NeedSavepoints):
            raise
        except sa.exc.SQLAlchemyError as exc:
            if not savepoints and not disconnect(exc):
                raise NeedSavepoints from exc  # e.g. a flush at commit failed
            raise BatchFailed(first_line(exc)) from exc
        finally:
            spans.end(committed)


class _Batch:
    """One attempt at a batch, inside its transaction."""

    def __init__(self, applier: BatchApplier, session: Session, savepoints: bool,
                 failure: Failure | None, spans: tracing.Spans) -> None:
        self.a = applier
        self.spans = spans
        self.session = session
        self.conn = session.connection()
        self.savepoints = savepoints
        self.failure = failure
        self.out = Outcome()
        self.finished: set[uuid.UUID] = set()
        self.retried: set[uuid.UUID] = set()  # had failed before, finished now
        self.root: SessionTransaction | None = session.get_transaction()

    def walk(self, parts: Parts) -> Outcome:
        a, out = self.a, self.out
        ids = [e.id for _, recs in parts for _, e in recs if isinstance(e, Event)]
        claimed: dict[uuid.UUID, Prior | None] | None = None
        if ids and a.dedupe():
            claimed = a.inbox.claim(self.conn, a.group, ids)
            priors = {i: p for i, p in claimed.items() if p is not None}
        else:
            priors = a.inbox.priors(self.conn, a.group, ids) if ids else {}
        # one call for the whole batch, unless an event failed before: then one each,
        # so the one that fails is found
        batch: list[tuple[Record, Event]] | None = (
            [] if a.calls.batched and not self.savepoints and not priors else None)
        seen: set[uuid.UUID] = set()
        for tp, recs in parts:
            po = out.part(tp)
            for record, event in recs:
                if a.stopping():
                    po.rewind = record.offset
                    break
                if isinstance(event, MalformedRecord):
                    po.dead.append(DeadLetter(tp, record, REASON_MALFORMED, str(event)))
                    break  # the rest of the partition waits for the copy
                if claimed is not None and (event.id not in claimed or event.id in seen):
                    self._span(record, event, "duplicate")
                    out.duplicates += 1  # processed before, or met earlier in this batch
                    po.next_offset = record.offset + 1
                    continue
                seen.add(event.id)
                prior = priors.get(event.id)
                if prior is not None and a.retries.exhausted(prior.attempts):
                    self._span(record, event, "dead_lettered")
                    po.dead.append(DeadLetter(tp, record, REASON_FAILED,
                                              prior.error or "failed before", event.id))
                    break
                if batch is not None:
                    batch.append((record, event))
                elif not self._one(tp, record, event, prior is not None):
                    break  # held, or to be dead-lettered
                po.next_offset = record.offset + 1
        if batch:
            self._batch(batch)
        if claimed:
            unfinished = set(claimed) - self.finished  # failed, held back, cut short
            if unfinished:
                a.inbox.unclaim(self.conn, a.group, sorted(unfinished))
        if self.retried:
            a.inbox.forget_attempts(self.conn, a.group, sorted(self.retried))
        return out

    def _span(self, record: Record, event: Event, outcome: str = "applied"
              ) -> tracing.ProcessSpan:
        return self.spans.start(record.topic, record.partition, event.id,
                                record.headers, outcome)

    def _batch(self, batch: list[tuple[Record, Event]]) -> None:
        events = [e for _, e in batch]
        assert self.root is not None
        spans = [self._span(record, event) for record, event in batch]
        try:
            self.a.calls.call(self.session, (self.root,), events, batch[0][0], batch=True)
        except HandlerMisuse:
            raise
        except Exception as exc:
            for span in spans:
                span.error = exc
            if connection_lost(exc, self.conn):
                raise BatchFailed(first_line(exc)) from exc
            raise NeedSavepoints from exc  # whose failure it was, the redo finds out
        self.finished.update(e.id for e in events)
        self.out.processed += len(events)

    def _one(self, tp: TopicPartition, record: Record, event: Event, retried: bool) -> bool:
        """Handle one event. True when done; False when its partition must stop there
        (held for the retry, or waiting for the event's dead-letter copy)."""
        assert self.root is not None
        if not self.savepoints:
            span = self._span(record, event)
            try:
                with span.current():
                    self.a.calls.call(self.session, (self.root,), [event], record)
            except HandlerMisuse:
                raise
            except Exception as exc:
                span.error = exc
                if connection_lost(exc, self.conn):
                    raise BatchFailed(first_line(exc)) from exc
                raise NeedSavepoints((tp, record.offset, exc)) from exc
            return self._done(event, retried)
        if self.failure is not None and self.failure[:2] == (tp, record.offset):
            # it failed on the fast path a moment ago: that was this attempt
            return self._failed(tp, record, event, self.failure[2], self._span(record, event))
        span = self._span(record, event)
        begin_for_savepoint(self.session)
        sp = self.session.begin_nested()
        # SQLAlchemy emits the SAVEPOINT lazily, at the session's next statement: make it
        # happen now, so whatever the handler does (even through the raw connection) is
        # inside it.
        self.session.connection()
        try:
            with span.current():
                self.a.calls.call(self.session, (self.root, sp), [event], record)
            sp.commit()  # flushes the handler's pending ORM changes, releases the savepoint
        except HandlerMisuse:
            raise
        except Exception as exc:
            self._rollback(sp, exc)
            return self._failed(tp, record, event, exc, span)
        return self._done(event, retried)

    def _done(self, event: Event, retried: bool) -> bool:
        self.finished.add(event.id)
        if retried:
            self.retried.add(event.id)
        self.out.processed += 1
        return True

    def _failed(self, tp: TopicPartition, record: Record, event: Event,
                exc: Exception, span: tracing.ProcessSpan) -> bool:
        error = f"{type(exc).__name__}: {exc}"
        attempts = self.a.inbox.record_attempt(self.conn, self.a.group, event.id, error)
        self.a.retries.failed(self.out, tp, record, event, error, attempts)
        span.error = exc
        span.outcome = "dead_lettered" if self.a.retries.exhausted(attempts) else "retried"
        return False

    def _rollback(self, sp: SessionTransaction, exc: BaseException) -> None:
        """Roll back one event's savepoint; a lost connection fails the whole batch."""
        try:
            sp.rollback()
        except Exception as rb:
            raise BatchFailed(f"{first_line(exc)}; then {first_line(rb)}") from exc
        if connection_lost(exc, self.conn):
            raise BatchFailed(first_line(exc)) from exc


def begin_for_savepoint(session: Session) -> None:
    """pysqlite and aiosqlite begin SQLite's transaction lazily, at the first write: a
    SAVEPOINT before that would begin it instead. So begin it first (SQLite only)."""
    conn = session.connection()
    if conn.dialect.name == "sqlite" and not getattr(
            conn.connection.driver_connection, "in_transaction", True):
        conn.exec_driver_sql("BEGIN")


def disconnect(exc: BaseException) -> bool:
    """An error that means the database connection is gone (not a bad statement)."""
    import psycopg

    lost = (psycopg.OperationalError, psycopg.InterfaceError)
    if isinstance(exc, sa.exc.DBAPIError):
        return bool(exc.connection_invalidated) or isinstance(exc.orig, lost)
    return isinstance(exc, lost)


def connection_lost(exc: BaseException, conn: sa.Connection) -> bool:
    """Whether `exc` (raised by a handler) left the batch's connection unusable. Ask
    before the session gives the connection back."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if conn.invalidated:
        return True
    try:
        raw = conn.connection.driver_connection
    except Exception:
        return True
    return bool(getattr(raw, "broken", False) or getattr(raw, "closed", False) is True)
