"""The applier of `external` consumers: side effects outside the database.

Each event gets its own transaction, and its dedupe record joins that transaction only
after `handle` returned, so a dedupe record never exists for an effect that did not
happen. A crash after the effect and before the commit repeats the effect: the handler
gets `event.id` to use as its idempotency key downstream.
"""

from __future__ import annotations

import contextlib
import uuid

import sqlalchemy as sa

from outbox import tracing
from outbox.backoff import first_line
from outbox.consumer.applier import Applier, connection_lost
from outbox.consumer.calls import HandlerMisuse
from outbox.consumer.deadletter import REASON_FAILED, REASON_MALFORMED
from outbox.consumer.inbox import Prior
from outbox.consumer.outcome import BatchFailed, DeadLetter, Outcome, Parts
from outbox.consumer.source import Record, TopicPartition
from outbox.errors import MalformedRecord
from outbox.event import Event


class ExternalApplier(Applier):
    """Applies a batch one event (and one transaction) at a time."""

    def apply(self, parts: Parts) -> Outcome:
        out = Outcome()
        ids = list({e.id for _, recs in parts for _, e in recs if isinstance(e, Event)})
        dedupe = self.dedupe()
        spans = tracing.Spans(self.group)  # each event's outcome is final when it ends
        try:
            seen: set[uuid.UUID] = set()
            priors: dict[uuid.UUID, Prior] = {}
            if ids:
                with self.sessions() as session:
                    conn = session.connection()
                    seen = self.inbox.processed(conn, self.group, ids) if dedupe else set()
                    priors = self.inbox.priors(conn, self.group, ids)
            for tp, recs in parts:
                po = out.part(tp)
                for record, event in recs:
                    if self.stopping():
                        po.rewind = record.offset
                        break
                    if isinstance(event, MalformedRecord):
                        po.dead.append(DeadLetter(tp, record, REASON_MALFORMED, str(event)))
                        break  # the rest of the partition waits for the copy
                    if event.id in seen:
                        spans.start(tp.topic, tp.partition, event.id, record.headers,
                                    "duplicate")
                        out.duplicates += 1
                        po.next_offset = record.offset + 1
                        continue
                    prior = priors.get(event.id)
                    if prior is not None and self.retries.exhausted(prior.attempts):
                        spans.start(tp.topic, tp.partition, event.id, record.headers,
                                    "dead_lettered")
                        po.dead.append(DeadLetter(tp, record, REASON_FAILED,
                                                  prior.error or "failed before", event.id))
                        break
                    span = spans.start(tp.topic, tp.partition, event.id,
                                       record.headers)
                    if not self._one(tp, record, event, prior, dedupe, seen, out, span):
                        break
                    po.next_offset = record.offset + 1
        except (BatchFailed, HandlerMisuse):
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise BatchFailed(first_line(exc)) from exc
        finally:
            spans.end(committed=True)
        return out

    def _one(self, tp: TopicPartition, record: Record, event: Event, prior: Prior | None,
             dedupe: bool, seen: set[uuid.UUID], out: Outcome,
             span: tracing.ProcessSpan) -> bool:
        with self.sessions() as session:
            conn = session.connection()
            root = session.get_transaction()
            assert root is not None
            try:
                with span.current():
                    self.calls.call(session, (root,), [event], record)
                # Only now, after the handler succeeded: the dedupe record, in the same
                # transaction as the handler's own writes.
                fresh = not dedupe or bool(self.inbox.mark_processed(conn, self.group,
                                                                     [event.id]))
                if fresh:
                    if prior is not None:
                        self.inbox.forget_attempts(conn, self.group, [event.id])
                    session.commit()
                else:
                    session.rollback()  # another consumer finished it first: keep its effects
                    span.outcome = "duplicate"
            except HandlerMisuse as exc:
                span.error, span.outcome = exc, "redone"
                raise
            except Exception as exc:
                # until the attempt is recorded: the batch fails and is applied again
                span.error, span.outcome = exc, "redone"
                lost = connection_lost(exc, conn)
                with contextlib.suppress(Exception):
                    session.rollback()
                if lost:
                    raise BatchFailed(first_line(exc)) from exc
                error = f"{type(exc).__name__}: {exc}"
                attempts = self._record_attempt(event.id, error)
                self.retries.failed(out, tp, record, event, error, attempts)
                span.error = exc
                span.outcome = "dead_lettered" if self.retries.exhausted(attempts) \
                    else "retried"
                return False
        if dedupe:
            seen.add(event.id)
        if fresh:
            out.processed += 1
        else:
            out.duplicates += 1
        return True

    def _record_attempt(self, event_id: uuid.UUID, error: str) -> int:
        with self.sessions() as session, session.begin():
            return int(self.inbox.record_attempt(session.connection(), self.group, event_id,
                                                 error))
