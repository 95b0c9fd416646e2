"""The default relay round (at least once): claim a batch over the owned shards, send
it, and while Kafka works on it claim and send the next events of the shards that have
more (when that is safe: Store.claim_next); settle each batch in order (outbox.sending)
while the next is in flight, up to MAX_BATCHES a round.
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
from outbox.cursors import Cursors, full_shards
from outbox.producer_slot import ProducerSlot
from outbox.publisher import Publisher
from outbox.sending import Sender, Sent, Settled
from outbox.store import Claim

log = logging.getLogger("outbox.relay")

#: Batches one round may send: each after the first is claimed while the one before is
#: in flight. The round then returns, so the relay's own chores are not kept waiting.
MAX_BATCHES = 8


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
        """Send the claim, then keep a window of two batches in flight: the next events
        of the shards that filled their slice are claimed (while the batch before is
        sent, see `_send`) and sent while Kafka acknowledges the batch before, which is
        then settled. Up to MAX_BATCHES per round; the window closes at the first
        failure, or when the relay is stopping, and the rest is settled in order."""
        started = time.monotonic()
        first, nxt = (self._send(conn, publisher, claim, per_shard, [], MAX_BATCHES > 1)
                      if not naive else (self.sender.send(conn, publisher, claim.rows), None))
        if not first:
            return Settled()
        crash_point("relay.after_send")
        out = Settled(sent=len(first))
        halted: set[int] = set()
        window = [first]
        batches = 1
        acked: list[int] = []  # acknowledged, deleted before the next claim (see _send)
        while window:
            if nxt is not None and nxt.rows and not self.sender.stopping():
                more = batches + 1 < MAX_BATCHES
                batch, nxt = self._send(conn, publisher, nxt, per_shard, acked, more)
                acked = []
                if batch:
                    window.append(batch)
                    batches += 1
                    out.sent += len(batch)
            settled = self._settle(conn, publisher, window.pop(0), set(), halted, defer=True)
            acked += settled.positions
            out.acked += settled.acked
            out.broken |= settled.broken
            if out.broken or settled.stuck or halted:
                nxt = None  # no more sends this round: settle what is in flight
        if acked:
            self.sender.acknowledge(conn, acked)
        if out.broken:  # once the round is settled: its deliveries are all accounted for
            self.producer.replace()
        self.metrics.batch(time.monotonic() - started, out.acked)
        log.debug("relay %s: %d events sent in %d batches, %d acknowledged in %.3fs",
                  self.sender.relay_id, out.sent, batches, out.acked,
                  time.monotonic() - started)
        return out

    def _send(self, conn: psycopg.Connection[Any], publisher: Publisher, claim: Claim,
              per_shard: int, acked: list[int], more: bool) -> tuple[Sent, Claim | None]:
        """Send the claim's rows; with `more`, return the next claim of the shards whose
        whole slice went out, checked against this claim's snapshot (each claim against
        the one before it: docs/design.md, "Cursors").

        The next claim runs on a worker thread (Cursors.claim_next_during) while this sends,
        after the delete of the events `acked` since the last one, so PostgreSQL does
        both meanwhile. Sending leaves the database untouched, so claiming first changes
        nothing the claim relies on. It reads past everything sent, so rows acknowledged
        and not yet deleted are not its business; the round's last delete comes before
        the next round's first claim, which may start from a shard's beginning. A shard
        whose head waits for a retry, or that was refused at once, stops there, as it
        does within a batch."""
        rows, snapshot = claim.rows, claim.snapshot
        full = full_shards(rows, per_shard) if more and snapshot is not None else []
        if not full or snapshot is None:
            if acked:
                self.sender.acknowledge(conn, acked)
            return self.sender.send(conn, publisher, rows), None
        last = {row.shard: row.position for row in rows}
        sent, claimed = self.cursors.claim_next_during(
            conn, full, per_shard, last, snapshot,
            meanwhile=lambda: self.sender.send(conn, publisher, rows),
            before=(lambda: self.sender.acknowledge(conn, acked)) if acked else None)
        counts = Counter(row.shard for row, _ in sent)
        go_on = {s for s in full if counts[s] == per_shard}
        return sent, claimed._replace(rows=[r for r in claimed.rows if r.shard in go_on])

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
                isolated: set[int], halted: set[int], defer: bool = False) -> Settled:
        """Await a sent batch and settle it (outbox.sending); the acknowledged prefix of
        each shard becomes its cursor."""
        stuck = not self.sender.wait(conn, publisher, batch)
        if stuck:
            self.producer.replace()
        settled = self.sender.settle(conn, batch, isolated, halted, defer)
        settled.stuck = stuck
        self.cursors.acked(settled.heads)
        return settled

