"""After a batch's transaction: dead letters, then the offset commit, then the holds.

Dead-letter copies are sent only now, outside the database transaction, each waited
for in its partition's offset order. A partition moves past a dead-lettered record
only once Kafka acknowledged the copy and the event was recorded as processed (its
dedupe record inserted, its attempts deleted, in a short transaction of its own). If
a copy cannot be sent, the partition's offset stays at that record and the partition
is held: it retries the copy later (or is `stuck`, red health, if no truncation fits).
A crash between the ack and that record sends the copy again after the restart: the
dead-letter topic is at-least-once, like any Kafka topic fed by a retrying producer.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox.backoff import Throttled, first_line, jitter
from outbox.consumer.deadletter import (
    REASON_MALFORMED,
    DeadLetterFailed,
    DeadLetterStuck,
)
from outbox.consumer.outcome import RETRY_BACKOFF_MAX, DeadLetter, Outcome
from outbox.consumer.partitions import Hold
from outbox.consumer.source import CommitFailed, CommitRefused, TopicPartition
from outbox.logs import fields

if TYPE_CHECKING:
    from outbox.consumer.runner import ConsumerRunner

log = logging.getLogger("outbox.consumer")


class Finisher:
    """Completes a batch the applier committed (see the module docstring)."""

    def __init__(self, runner: ConsumerRunner) -> None:
        self.r = runner
        self.throttle = Throttled(log, fields=fields(consumer_group=runner.group_id))

    def finish(self, out: Outcome, started: float) -> int:
        r = self.r
        commits: dict[TopicPartition, int] = {}
        holds: dict[TopicPartition, Hold] = {}
        sent: list[DeadLetter] = []
        for tp, po in out.parts.items():
            if po.next_offset is not None:
                commits[tp] = po.next_offset
            if po.hold is not None:
                holds[tp] = po.hold
            for dl in po.dead:  # (at most one: the partition stopped there)
                hold = self._send(dl)
                if hold is not None:
                    holds[tp] = hold
                else:
                    sent.append(dl)
        recorded = self._record(sent)
        for dl in sent:
            if dl in recorded:  # done: the partition goes on from the next record
                commits[dl.tp] = dl.record.offset + 1
                r._seek(dl.tp, dl.record.offset + 1)
            else:  # the copy went, the record of it did not: again later
                holds[dl.tp] = Hold(dl.record.offset, time.monotonic() + 1.0)
        for tp, po in out.parts.items():
            if po.rewind is not None and tp not in holds:
                r._seek(tp, po.rewind)  # cut short by stop(): the next owner starts there
        for tp, hold in holds.items():
            r.partitions.hold(tp, hold)
        self._commit(commits)
        for tp, offset in commits.items():
            r.partitions.moved_past(tp, offset)
        dead = [dl.reason for dl in recorded]
        s = r.stats
        s.batches += 1
        s.processed += out.processed
        s.duplicates += out.duplicates
        s.failed += out.failed
        s.dead_lettered += len(dead)
        s.malformed += dead.count(REASON_MALFORMED)
        for _ in range(out.failed):
            r.metrics.failed()
        r.metrics.batch(time.monotonic() - started, out.processed, out.duplicates, dead)
        return out.processed + out.duplicates + len(dead)

    def _send(self, dl: DeadLetter) -> Hold | None:
        """Send one copy; None when acknowledged, else how its partition waits."""
        r, record = self.r, dl.record
        topic = r.dead_letters.topic_for(record)
        try:
            truncated = r.dead_letters.send(record, dl.reason, dl.error)
        except DeadLetterStuck as exc:
            # Loud, and red on /healthz: this needs an operator (a larger max.message.bytes
            # on the dead-letter topic). The partition retries now and then.
            log.error("consumer %s: cannot dead-letter %s[%d] offset %d to %s, not even "
                      "truncated (%s); the partition is stuck until %s accepts the copy "
                      "(raise its max.message.bytes), and the health check is red",
                      r.group_id, record.topic, record.partition, record.offset, topic,
                      exc, topic)
            return Hold(record.offset, time.monotonic() + RETRY_BACKOFF_MAX, stuck=True)
        except DeadLetterFailed as exc:
            delay = jitter(min(RETRY_BACKOFF_MAX, max(r.consumer.retry_backoff, 1.0)))
            self.throttle.warn("kafka", f"consumer {r.group_id}: cannot dead-letter "
                               f"{record.topic}[{record.partition}] offset {record.offset} "
                               f"to {topic} ({exc}); the partition waits")
            return Hold(record.offset, time.monotonic() + delay)
        log.error("consumer %s: %s[%d] offset %d dead-lettered to %s (%s%s): %s",
                  r.group_id, record.topic, record.partition, record.offset, topic, dl.reason,
                  f"; too large, {truncated} truncated" if truncated else "", dl.error,
                  extra=fields(consumer_group=r.group_id, topic=record.topic,
                               partition=record.partition, offset=record.offset,
                               event_id=str(dl.event_id) if dl.event_id else None))
        return None

    def _record(self, sent: list[DeadLetter]) -> list[DeadLetter]:
        """Record the dead-lettered events as processed (and drop their attempts).
        Returns the dead letters now done for good (all, or on a database error, those
        without an event id)."""
        ids = sorted({dl.event_id for dl in sent if dl.event_id is not None})
        if not ids:
            return sent
        r = self.r

        def record() -> None:
            with r.db.sessions() as session, session.begin():
                conn = session.connection()
                r.db.inbox.mark_processed(conn, r.group_id, ids)
                r.db.inbox.forget_attempts(conn, r.group_id, ids)
        try:
            r.db.run(record)
        except sa.exc.SQLAlchemyError as exc:
            self.throttle.warn("db", f"consumer {r.group_id}: dead-lettered events not "
                               f"recorded as processed ({first_line(exc)}); their partitions "
                               "retry them")
            return [dl for dl in sent if dl.event_id is None]
        return sent

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        r = self.r
        if not offsets or r.source is None:
            return
        try:
            r.source.commit(offsets)
        except CommitRefused as exc:
            log.warning("consumer %s: offset commit refused after a rebalance (%s); harmless: "
                        "the next owner redelivers and the dedupe records skip what was "
                        "applied", r.group_id, exc)
        except CommitFailed as exc:
            self.throttle.warn("commit", f"consumer {r.group_id}: offset commit failed "
                               f"({exc}); redeliveries will be skipped")
        else:
            self.throttle.recovered("commit", f"consumer {r.group_id}: offsets commit again")


__all__: list[Any] = ["Finisher"]
