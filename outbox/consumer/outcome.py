"""What applying a batch decided, partition by partition, and the retry policy.

The appliers (outbox.consumer.applier, .external) walk each partition's records in
offset order and note, per partition, how far it got (`next_offset`), which records
must go to the dead-letter topic (sent by the runner after the transaction, never
inside it), and whether it must wait (`hold`: a failed event's retry) or was cut short
by a stop (`rewind`).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from outbox.backoff import Throttled, exponential, jitter
from outbox.consumer.deadletter import REASON_FAILED
from outbox.consumer.partitions import Hold
from outbox.consumer.source import Batch, Record, TopicPartition
from outbox.errors import MalformedRecord
from outbox.event import Event, from_record
from outbox.logs import fields
from outbox.serde import decode

log = logging.getLogger("outbox.consumer")

#: The longest wait between two attempts of an event.
RETRY_BACKOFF_MAX = 10.0

Decoded = Event | MalformedRecord
Parts = list[tuple[TopicPartition, list[tuple[Record, Decoded]]]]


@dataclass
class DeadLetter:
    """A record to dead-letter once the batch's transaction is over."""

    tp: TopicPartition
    record: Record
    reason: str
    error: str
    event_id: uuid.UUID | None = None  # recorded as processed once the copy is acked


@dataclass
class PartitionOutcome:
    """Where a partition stands after the transaction: records before `next_offset` are
    done; at most one record waits for its dead-letter copy (the partition stopped
    there, and goes on from the next record once the copy is acknowledged)."""

    next_offset: int | None = None
    dead: list[DeadLetter] = field(default_factory=list)
    hold: Hold | None = None
    rewind: int | None = None  # cut short by stop(): seek back here


@dataclass
class Outcome:
    parts: dict[TopicPartition, PartitionOutcome] = field(default_factory=dict)
    processed: int = 0
    duplicates: int = 0
    failed: int = 0

    def part(self, tp: TopicPartition) -> PartitionOutcome:
        po = self.parts.get(tp)
        if po is None:
            po = self.parts[tp] = PartitionOutcome()
        return po


class BatchFailed(Exception):
    """The database (or the connection to it) failed: nothing of the batch counts."""


class Retries:
    """What a failed attempt leads to: a hold with backoff, or the dead-letter topic
    after `max_attempts` attempts in total (counted in the database)."""

    def __init__(self, group: str, max_attempts: int, retry_backoff: float) -> None:
        self.group = group
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.throttle = Throttled(log, fields=fields(consumer_group=group))

    def delay(self, attempts: int) -> float:
        return jitter(exponential(self.retry_backoff, attempts, RETRY_BACKOFF_MAX))

    def exhausted(self, attempts: int) -> bool:
        return attempts >= self.max_attempts

    def failed(self, out: Outcome, tp: TopicPartition, record: Record, event: Event,
               error: str, attempts: int) -> None:
        """Note a failed attempt: the event goes to the dead-letter topic (its partition
        goes on once the copy is acknowledged), or its partition waits for the retry."""
        out.failed += 1
        if self.exhausted(attempts):
            out.part(tp).dead.append(DeadLetter(tp, record, REASON_FAILED, error, event.id))
            return
        delay = self.delay(attempts)
        out.part(tp).hold = Hold(record.offset, time.monotonic() + delay)
        self.throttle.warn(
            f"handler {tp}", f"consumer {self.group}: handler failed on event {event.id} "
            f"({record.topic}[{record.partition}] offset {record.offset}), attempt "
            f"{attempts}/{self.max_attempts}: {error}; the partition retries in {delay:.2f}s",
            event_id=str(event.id), topic=record.topic, partition=record.partition,
            offset=record.offset, attempt=attempts)


def decode_batch(batch: Batch, id_header: str) -> Parts:
    """Each partition's records in offset order, each turned back into an Event (or the
    MalformedRecord saying why it cannot be one)."""
    parts: Parts = []
    for tp, records in batch.items():
        if not records:
            continue
        decoded: list[tuple[Record, Decoded]] = []
        for r in sorted(records, key=lambda r: r.offset):
            try:
                decoded.append((r, from_record(
                    topic=r.topic, key=r.key, value=r.value,
                    headers=r.headers or (),  # type: ignore[arg-type]  # None is b""
                    decode=decode, id_header=id_header)))
            except MalformedRecord as exc:
                decoded.append((r, exc))
        parts.append((TopicPartition(tp.topic, tp.partition), decoded))
    return parts
