"""One batch's way through Kafka, for the relay: send the claimed rows in order, wait
for every answer while keeping the relay's session alive, then settle each shard's
acknowledged prefix (delete it; retry or dead-letter its first failure).

The relay (outbox.relay) decides what to claim and when; this module decides what each
answer means for the outbox, so the ordering rules of settling live in one place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from outbox import _unsafe
from outbox._faults import crash_point
from outbox.backoff import Throttled, exponential, jitter
from outbox.logs import fields
from outbox.metrics import RelayMetrics
from outbox.publisher import Delivery, Publisher, breaks_producer, is_attempt, is_permanent
from outbox.relay_config import RelayConfig
from outbox.store import Row, Store

log = logging.getLogger("outbox.relay")

Sent = list[tuple[Row, Delivery]]


@dataclass
class Settled:
    """What settling a batch did."""

    acked: int = 0
    sent: int = 0  # records sent (the exactly-once cycle's; idle when 0)
    broken: bool = False  # the producer must be replaced (a fatal error was seen)
    stuck: bool = False  # Kafka left deliveries unanswered: the producer was replaced
    positions: list[int] = field(default_factory=list)  # acknowledged, delete deferred
    heads: dict[int, int] = field(default_factory=dict)  # shard -> last acknowledged position


class Sender:
    """Sends, awaits and settles batches for one relay (see the module docstring).

    `suspects` are shards whose head must next be sent alone: a permanent error was
    seen there, but kafka-python fails every batch in flight, of every partition, when
    one record is refused (the idempotent producer bumps its epoch), so the culprit is
    only known once its shard's head is the only record in flight (`send_alone`). The
    suspects are cleared one at a time.
    """

    def __init__(self, relay_id: str, config: RelayConfig, store: Store,
                 metrics: RelayMetrics, throttle: Throttled,
                 grace_left: Callable[[], float], stopping: Callable[[], bool]) -> None:
        self.relay_id = relay_id
        self.config = config
        self.store = store
        self.metrics = metrics
        self.throttle = throttle
        self.grace_left = grace_left
        self.stopping = stopping
        self.suspects: set[int] = set()

    def send(self, conn: psycopg.Connection[Any], publisher: Publisher,
             rows: list[Row]) -> Sent:
        """Send claimed rows in order, skipping each shard from a head that must wait."""
        batch: Sent = []
        blocked: set[int] = set()
        # A send may block (on a topic's metadata) for up to max_block_ms; several such
        # sends in a row must not leave the session idle past its lease.
        heartbeat = self.config.lease_seconds / 3
        touched = time.monotonic()
        for row in rows:
            if row.shard in blocked:
                continue
            if row.backing_off:  # the shard's head waits for its retry: the shard waits
                blocked.add(row.shard)
                continue
            delivery = publisher.send(row.topic, row.key, row.value, row.headers)
            batch.append((row, delivery))
            if delivery.done() and delivery.error() is not None:
                blocked.add(row.shard)  # refused at once: the rest would only be sent twice
            if time.monotonic() - touched > heartbeat:
                conn.execute("SELECT 1")
                touched = time.monotonic()
        if batch and _unsafe.disabled("ack"):  # fault injection: forget them before the ack
            self.store.acknowledge(conn, [r.position for r, _ in batch], keep=False)
            log.debug("relay %s: UNSAFE: deleted %d events before Kafka acknowledged them",
                      self.relay_id, len(batch))
        return batch

    def send_alone(self, conn: psycopg.Connection[Any], publisher: Publisher,
                   shard: int) -> Sent:
        """Claim and send the head of suspect `shard` with nothing else in flight: only
        an event refused then is known to be the culprit (see the class docstring)."""
        rows = self.store.claim(conn, [shard], 1).rows
        if not rows or rows[0].backing_off:
            return []
        row = rows[0]
        batch = [(row, publisher.send(row.topic, row.key, row.value, row.headers))]
        crash_point("relay.after_send")
        return batch

    def wait(self, conn: psycopg.Connection[Any], publisher: Publisher, batch: Sent) -> bool:
        """Wait for every delivery, keeping the session alive; give up only when stopping
        and past the grace period (the events stay pending and are sent again). False
        when Kafka left them unanswered past `send_timeout`: replace the producer."""
        give_up = time.monotonic() + self.config.send_timeout
        while not all(d.done() for _, d in batch):
            publisher.flush(timeout=min(1.0, self.grace_left()))
            if all(d.done() for _, d in batch):
                break
            conn.execute("SELECT 1")  # heartbeat: a live relay's session is never idle long
            if time.monotonic() > give_up:
                self.throttle.warn("stuck", f"relay {self.relay_id}: Kafka has not "
                                   f"acknowledged {sum(not d.done() for _, d in batch)} "
                                   f"events in {self.config.send_timeout:.0f}s; replacing "
                                   "the producer, the shards are sent again")
                return False
            if self.stopping() and self.grace_left() <= 0:
                log.warning("relay %s: abandoning %d unacknowledged events at shutdown; "
                            "they stay in the outbox", self.relay_id,
                            sum(not d.done() for _, d in batch))
                break
        return True

    def settle(self, conn: psycopg.Connection[Any], batch: Sent, isolated: set[int],
               halted: set[int], defer: bool = False) -> Settled:
        """Delete each shard's acknowledged prefix; retry or dead-letter its first failure.

        Events after a shard's first failure stay pending even if Kafka took them: they
        are sent again after it, so each key's first deliveries keep their order. Only
        an event refused while its shard is in `isolated` (sent alone) is dead-lettered
        for a permanent error; otherwise its shard becomes a suspect. `halted` carries
        the shards that stopped in an earlier batch of the same cycle. With `defer`, the
        acknowledged positions are returned (`Settled.positions`) for the caller to
        delete with `acknowledge` before its next claim.
        """
        out = Settled()
        acked: list[int] = []
        for row, delivery in batch:
            if row.shard in halted:
                continue
            if not delivery.done():
                halted.add(row.shard)
                continue
            error = delivery.error()
            if error is None:
                acked.append(row.position)
                out.heads[row.shard] = row.position
                continue
            out.broken |= breaks_producer(error)
            halted.add(row.shard)
            self.account(conn, row, error, row.shard in isolated)
        if acked:
            crash_point("relay.after_ack")
        if acked and not _unsafe.disabled("ack"):
            if defer:
                out.positions = acked
            else:
                self.acknowledge(conn, acked)
        out.acked = len(acked)
        return out

    def acknowledge(self, conn: psycopg.Connection[Any], positions: list[int]) -> None:
        """Delete (or mark) acknowledged events: settle's last step, or the caller's when
        it deferred it."""
        self.store.acknowledge(conn, positions, keep=self.config.retention_seconds is not None)

    def account(self, conn: psycopg.Connection[Any], row: Row, error: BaseException,
                isolated: bool) -> None:
        """What a refused event means: nothing (never reached Kafka), a suspect shard,
        a dead letter, or a failed attempt retried after a backoff. `isolated`: it was
        the only record in flight. (The exactly-once sender uses it too.)"""
        text = f"{type(error).__name__}: {error}"
        if not is_attempt(error):  # never reached Kafka: try again, no attempt spent
            return
        if is_permanent(error) and not isolated:
            self.suspects.add(row.shard)
            return
        if is_permanent(error) or row.attempts + 1 >= self.config.max_attempts:
            self.store.dead_letter(conn, row.position, text)
            self.metrics.dead_lettered()
            log.error("relay %s: event %s (topic %s, key %r) dead-lettered: %s",
                      self.relay_id, row.event_id, row.topic,
                      row.key.decode(errors="replace"), text,
                      extra=fields(relay_id=self.relay_id, event_id=row.event_id,
                                   topic=row.topic, shard=row.shard,
                                   attempt=row.attempts + 1))
            return  # the next batch goes on after it
        delay = jitter(exponential(self.config.retry_base, row.attempts + 1,
                                   self.config.retry_max))
        self.store.record_failure(conn, row.position, text, delay)
        self.metrics.failed()
        self.throttle.warn(f"send{row.shard}", f"relay {self.relay_id}: send of event "
                           f"{row.event_id} failed ({text}); shard {row.shard} retries "
                           f"in {delay:.1f}s", event_id=row.event_id, topic=row.topic,
                           shard=row.shard, attempt=row.attempts + 1)
