"""The default relay round (at least once): claim a batch over the owned shards, send
it, and while Kafka works on it claim and send the next events of the shards that have
more (when that is safe: Store.claim_next); then settle both, in order (outbox.sending).
A shard with a suspect head has that head sent alone first (Sender.suspects).

The relay (outbox.relay) owns the loop, the session and the shards; this is what one
round does with them. The exactly-once round is outbox.exactly_once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import psycopg

from outbox import _unsafe, tracing
from outbox._faults import crash_point
from outbox.cursors import Cursors
from outbox.producer_slot import ProducerSlot
from outbox.publisher import Publisher
from outbox.sending import Sender, Sent, Settled
from outbox.store import Claim, Row

log = logging.getLogger("outbox.relay")


class AtLeastOnce:
    def __init__(self, sender: Sender, producer: ProducerSlot, cursors: Cursors) -> None:
        self.sender = sender
        self.producer = producer
        self.cursors = cursors
        self.metrics = sender.metrics

    def round(self, conn: psycopg.Connection[Any], owned: set[int]) -> Settled:
        """One round over the `owned` shards; `sent` is 0 when there was nothing to send."""
        publisher = self.producer.get()
        naive = _unsafe.disabled("shards")
        self.sender.suspects &= owned
        if self.sender.suspects and not naive:
            return self._isolated(conn, publisher)
        shards = sorted(owned)
        per_shard = max(1, self.sender.config.batch_size // len(shards))
        if naive:  # fault injection: no ownership, row locks instead (see Relay.step)
            store = self.sender.store
            claim = Claim(store.claim_skip_locked(conn, min(per_shard, 100)), None, False)
        else:
            claim = self.cursors.claim(conn, shards, per_shard)
        if not claim.rows:
            self.metrics.backlog_empty()
            return Settled()
        with tracing.send_span(claim.rows, self.sender.relay_id):
            return self._publish(conn, publisher, claim, per_shard, naive)

    def _publish(self, conn: psycopg.Connection[Any], publisher: Publisher, claim: Claim,
                 per_shard: int, naive: bool) -> Settled:
        """Send the claim (and, pipelined, the next one of shards it filled), settle."""
        started = time.monotonic()
        # Shards whose claim came back full may hold more worth sending now. Their next
        # claim is sent first, in a pipeline: PostgreSQL runs it while this sends the
        # first batch, which leaves the database untouched (reading earlier changes
        # nothing the claim relies on). It is read after.
        snapshot = claim.snapshot
        full = [] if naive or snapshot is None else _full(claim.rows, per_shard)
        if full and snapshot is not None:
            last = {row.shard: row.position for row in claim.rows}
            with conn.pipeline():
                pending = self.cursors.send_next(conn, full, per_shard, last, snapshot)
                first = self.sender.send(conn, publisher, claim.rows)
                pipelined = self.cursors.next_claimed(pending)
        else:
            first = self.sender.send(conn, publisher, claim.rows)
        if not first:
            return Settled()
        crash_point("relay.after_send")
        second: Sent = []
        if full:
            # Only shards whose whole claim was sent go on: one whose head waits for a
            # retry or was refused at once stops there, as it does within a batch.
            counts = Counter(row.shard for row, _ in first)
            go_on = {s for s in full if counts[s] == per_shard}
            rows = [row for row in pipelined.rows if row.shard in go_on]
            if rows:
                second = self.sender.send(conn, publisher, rows)
        out = Settled(sent=len(first) + len(second))
        halted: set[int] = set()
        for batch in (first, second):
            if batch:
                settled = self._settle(conn, publisher, batch, set(), halted)
                out.acked += settled.acked
                out.broken |= settled.broken
        if out.broken:  # once the round is settled: its deliveries are all accounted for
            self.producer.replace()
        self.metrics.batch(time.monotonic() - started, out.acked)
        log.debug("relay %s: %d + %d events sent, %d acknowledged in %.3fs",
                  self.sender.relay_id, len(first), len(second), out.acked,
                  time.monotonic() - started)
        return out

    def _isolated(self, conn: psycopg.Connection[Any], publisher: Publisher) -> Settled:
        """Send the head of one suspect shard entirely alone (Sender.suspects); the other
        shards wait the few milliseconds each suspect takes."""
        shard = min(self.sender.suspects)
        self.sender.suspects.discard(shard)
        batch = self.sender.send_alone(conn, publisher, shard)
        if not batch:
            return Settled()
        settled = self._settle(conn, publisher, batch, {shard}, set())
        if settled.broken:
            self.producer.replace()
        settled.sent = len(batch)
        return settled

    def _settle(self, conn: psycopg.Connection[Any], publisher: Publisher, batch: Sent,
                isolated: set[int], halted: set[int]) -> Settled:
        """Await a sent batch and settle it (outbox.sending); the acknowledged prefix of
        each shard becomes its cursor."""
        if not self.sender.wait(conn, publisher, batch):
            self.producer.replace()
        settled = self.sender.settle(conn, batch, isolated, halted)
        self.cursors.acked(settled.heads)
        return settled


def _full(rows: list[Row], per_shard: int) -> list[int]:
    """Shards the claim filled (`per_shard` rows), none of them waiting for a retry."""
    counts: Counter[int] = Counter()
    waiting: set[int] = set()
    for row in rows:
        counts[row.shard] += 1
        if row.backing_off:
            waiting.add(row.shard)
    return [s for s, n in counts.items() if n == per_shard and s not in waiting]
