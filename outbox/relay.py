"""The relay: wait (NOTIFY | poll) -> claim -> publish -> wait for acks -> delete.

One PostgreSQL session per relay carries everything: its membership lock, its shard
locks, LISTEN, the claims and the deletes. If that session dies, the locks go with it
and every later statement fails, so a relay that lost its session cannot claim or
acknowledge anything for shards it no longer owns. `idle_session_timeout` bounds how
long a paused (SIGSTOPped) relay keeps its shards.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

import psycopg

from outbox import _unsafe, shardcount
from outbox._faults import crash_point
from outbox.backoff import Throttled, first_line, jitter
from outbox.dburl import libpq_url, mask
from outbox.diagnose import permanent_reason
from outbox.errors import ConfigError
from outbox.metrics import RelayMetrics
from outbox.ownership import ranges, take_fair_share
from outbox.publisher import Delivery, Publisher, breaks_producer, is_attempt, is_permanent
from outbox.relay_config import RelayConfig
from outbox.schema import make_tables
from outbox.store import Claim, Row, Store

log = logging.getLogger("outbox.relay")


class Relay:
    """Publishes the outbox of one database to Kafka, for the shards it owns."""

    def __init__(self, config: RelayConfig, publisher: Callable[[], Publisher],
                 metrics: RelayMetrics | None = None) -> None:
        self.config = config
        self.tables = make_tables(config.table_prefix)
        self.store = Store(self.tables)
        self.relay_id = config.relay_id or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self.metrics = metrics or RelayMetrics(None)
        self._publisher_factory = publisher
        self._publisher: Publisher | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._owned: set[int] = set()
        self.num_shards = 0  # read from the database on connecting
        self._stop = threading.Event()
        self._stop_by: float | None = None  # when stop() was called, plus the grace
        self._wake = threading.Event()
        self._next_rebalance = 0.0
        self._next_purge = 0.0
        self._throttle = Throttled(log)
        self._isolate: set[int] = set()  # suspect shards (see _isolated_cycle)
        # Per shard, a position below which every pending event was claimed or invisible
        # in self._since, the snapshot of the last claim (see Store.claim).
        self._cursor: dict[int, int] = {}
        self._since: str | None = None
        self.published = 0

    # -- control ----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the relay to finish (or abandon, after the grace period) its batch and exit."""
        if self._stop_by is None:
            self._stop_by = time.monotonic() + self.config.shutdown_grace
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """Skip the current wait (the in-process wake-up after a local commit)."""
        self._wake.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("relay %s: signal %d, finishing the batch in flight", self.relay_id, signum)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def healthy(self) -> bool:
        """For /healthz: the relay holds its database session (and so its shards)."""
        return self._conn is not None and not self._conn.closed

    @property
    def owned_shards(self) -> list[int]:
        return sorted(self._owned)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        log.info("relay %s starting on %s", self.relay_id, mask(self.config.db_url))
        backoff = self.config.retry_base
        try:
            while not self._stop.is_set():
                try:
                    self.step(wait=True)
                    backoff = self.config.retry_base
                except psycopg.Error as exc:
                    self._drop_connection()
                    _raise_if_permanent(exc)
                    # The cycle was abandoned with sends perhaps still in flight; the next
                    # owner resends them. A fresh producer keeps those stragglers from
                    # landing among (or, after a failure, ahead of) the new sends.
                    self._replace_publisher()
                    self._throttle.warn("db", f"relay {self.relay_id}: database unavailable "
                                        f"({first_line(exc)}); retrying with backoff")
                    self._stop.wait(jitter(backoff))
                    backoff = min(backoff * 2, 5.0)
                except _PublisherUnavailable as exc:
                    _raise_if_permanent(exc)
                    self._throttle.warn("kafka", f"relay {self.relay_id}: Kafka unavailable "
                                        f"({exc}); retrying with backoff")
                    self._stop.wait(jitter(backoff))
                    backoff = min(backoff * 2, 5.0)
        finally:
            self._close()
            log.info("relay %s stopped after publishing %d events", self.relay_id,
                     self.published)

    def step(self, wait: bool) -> int:
        """One round: connect if needed, rebalance when due, publish one batch or wait."""
        conn = self._connection()
        self._throttle.recovered("db", f"relay {self.relay_id}: database reachable again")
        if time.monotonic() >= self._next_rebalance:
            self._rebalance(conn)
        if not self._owned:
            if wait:
                self._wait(conn, self.config.poll_interval)
            return 0
        publisher = self._get_publisher()
        if _unsafe.disabled("shards"):
            # Fault injection: the naive scale-out, relays sharing the table through
            # row locks (FOR UPDATE SKIP LOCKED held across the send) instead of shards.
            with conn.transaction():
                done = self._cycle(conn, publisher)
        else:
            done = self._cycle(conn, publisher)
        if self.config.retention_seconds is not None and time.monotonic() >= self._next_purge:
            self.store.purge_published(conn, self.config.retention_seconds, 1000)
            self._next_purge = time.monotonic() + 5.0
        if done == 0 and wait:
            self._idle(conn)
        return done

    def _cycle(self, conn: psycopg.Connection[Any], publisher: Publisher) -> int:
        """Claim and send a batch; while Kafka works on it, claim and send the next events
        of the shards that have more (when that is safe: Store.claim_next); then settle
        both, in order."""
        naive = _unsafe.disabled("shards")
        self._isolate &= self._owned
        if self._isolate and not naive:
            return self._isolated_cycle(conn, publisher)
        shards = sorted(self._owned)
        per_shard = max(1, self.config.batch_size // len(shards))
        if naive:
            claim = Claim(self.store.claim_skip_locked(conn, min(per_shard, 100)), None, False)
        else:
            claim = self.store.claim(conn, shards, per_shard,
                                     [self._cursor.get(s, 0) for s in shards], self._since)
            self._advance_since(claim)
        if not claim.rows:
            self.metrics.backlog_empty()
            return 0
        started = time.monotonic()
        first = self._send(conn, publisher, claim.rows)
        if not first:
            return 0
        crash_point("relay.after_send")
        second: list[tuple[Row, Delivery]] = []
        if not naive:
            last: dict[int, int] = {}
            counts: Counter[int] = Counter()
            for row, _ in first:
                last[row.shard] = row.position
                counts[row.shard] += 1
            # Only shards whose whole claim was sent may hold more worth sending now.
            more = [s for s, n in counts.items() if n == per_shard]
            if more and claim.snapshot is not None:
                pipelined = self.store.claim_next(conn, more, per_shard,
                                                  [last[s] for s in more], claim.snapshot)
                if pipelined.from_cursor:
                    self._since = pipelined.snapshot
                second = self._send(conn, publisher, pipelined.rows)
        halted: set[int] = set()
        published = 0
        broken = False
        for batch in (first, second):
            if not batch:
                continue
            self._await(conn, publisher, batch)
            done, failed = self._settle(conn, batch, set(), halted)
            published += done
            broken |= failed
        if broken:  # once the cycle is settled: its deliveries are all accounted for
            self._replace_publisher()
        self.metrics.batch(time.monotonic() - started, published)
        log.debug("relay %s: %d + %d events sent, %d acknowledged in %.3fs", self.relay_id,
                  len(first), len(second), published, time.monotonic() - started)
        return len(first) + len(second)

    def _advance_since(self, claim: Claim) -> None:
        """After a claim (from the cursors or, unsafe, from the start): each shard it
        returned events of has nothing pending below its first one; the cursors stay
        valid against the claim's newer snapshot (docs/design.md, "Cursors")."""
        heads: dict[int, int] = {}
        for row in claim.rows:
            heads.setdefault(row.shard, row.position)
        for shard, head in heads.items():
            self._cursor[shard] = head - 1
        self._since = claim.snapshot

    def _isolated_cycle(self, conn: psycopg.Connection[Any], publisher: Publisher) -> int:
        """Send the head of one suspect shard entirely alone, with nothing else in flight.

        kafka-python fails every in-flight batch, of every partition, when one record is
        refused (the idempotent producer bumps its epoch), so a permanent error names no
        culprit. Only an event refused while it is the only record in flight is
        dead-lettered; the suspects are cleared one at a time, and the other shards wait
        the few milliseconds each takes.
        """
        shard = min(self._isolate)
        self._isolate.discard(shard)
        rows = self.store.claim(conn, [shard], 1).rows
        if not rows or rows[0].backing_off:
            return 0
        row = rows[0]
        batch = [(row, publisher.send(row.topic, row.key, row.value, row.headers))]
        crash_point("relay.after_send")
        self._await(conn, publisher, batch)
        broken = self._settle(conn, batch, {shard}, set())[1]
        if broken:
            self._replace_publisher()
        return 1

    def _send(self, conn: psycopg.Connection[Any], publisher: Publisher,
              rows: list[Row]) -> list[tuple[Row, Delivery]]:
        """Send claimed rows in order, skipping each shard from a head that must wait."""
        batch: list[tuple[Row, Delivery]] = []
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

    def _await(self, conn: psycopg.Connection[Any], publisher: Publisher,
               batch: list[tuple[Row, Delivery]]) -> None:
        """Wait for every delivery, keeping the session alive; give up only when stopping
        and past the grace period (the events stay pending and are sent again)."""
        give_up = time.monotonic() + self.config.send_timeout
        while not all(d.done() for _, d in batch):
            publisher.flush(timeout=min(1.0, self._grace_left()))
            if all(d.done() for _, d in batch):
                break
            conn.execute("SELECT 1")  # heartbeat: a live relay's session is never idle long
            if time.monotonic() > give_up:
                self._throttle.warn("stuck", f"relay {self.relay_id}: Kafka has not "
                                    f"acknowledged {sum(not d.done() for _, d in batch)} "
                                    f"events in {self.config.send_timeout:.0f}s; replacing "
                                    "the producer, the shards are sent again")
                self._replace_publisher()
                return
            if self._stop.is_set() and self._grace_left() <= 0:
                log.warning("relay %s: abandoning %d unacknowledged events at shutdown; "
                            "they stay in the outbox", self.relay_id,
                            sum(not d.done() for _, d in batch))
                return

    def _settle(self, conn: psycopg.Connection[Any], batch: list[tuple[Row, Delivery]],
                isolated: set[int], halted: set[int]) -> tuple[int, bool]:
        """Delete each shard's acknowledged prefix; retry or dead-letter its first failure.

        Events after a shard's first failure stay pending even if Kafka took them: they
        are sent again after it, so each key's first deliveries keep their order. A
        permanent error (e.g. too large) makes kafka-python fail every batch in flight,
        so the culprit is only known when its shard's head is sent alone (see
        _isolated_cycle): only an event refused on its own is dead-lettered. `halted`
        carries the shards that stopped in an earlier batch of the same cycle. Returns
        the number acknowledged and whether the producer must be replaced.
        """
        acked: list[int] = []
        broken = False
        for row, delivery in batch:
            if row.shard in halted:
                continue
            if not delivery.done():
                halted.add(row.shard)
                continue
            error = delivery.error()
            if error is None:
                acked.append(row.position)
                self._cursor[row.shard] = row.position  # the shard's acknowledged prefix
                continue
            broken |= breaks_producer(error)
            text = f"{type(error).__name__}: {error}"
            if not is_attempt(error):  # never reached Kafka: try again, no attempt spent
                halted.add(row.shard)
                continue
            if is_permanent(error) and row.shard not in isolated:
                self._isolate.add(row.shard)
                halted.add(row.shard)
                continue
            if is_permanent(error) or row.attempts + 1 >= self.config.max_attempts:
                self.store.dead_letter(conn, row.position, text)
                self.metrics.dead_lettered()
                log.error("relay %s: event %s (topic %s, key %r) dead-lettered: %s",
                          self.relay_id, row.event_id, row.topic,
                          row.key.decode(errors="replace"), text)
                halted.add(row.shard)  # the next batch goes on after it
                continue
            delay = jitter(min(self.config.retry_max, self.config.retry_base * 2 ** row.attempts))
            self.store.record_failure(conn, row.position, text, delay)
            self.metrics.failed()
            self._throttle.warn(f"send{row.shard}", f"relay {self.relay_id}: send of event "
                                f"{row.event_id} failed ({text}); shard {row.shard} retries "
                                f"in {delay:.1f}s")
            halted.add(row.shard)
        if acked:
            crash_point("relay.after_ack")
        if acked and not _unsafe.disabled("ack"):
            self.store.acknowledge(conn, acked, keep=self.config.retention_seconds is not None)
        self.published += len(acked)
        return len(acked), broken

    # -- shards -----------------------------------------------------------------------

    def _rebalance(self, conn: psycopg.Connection[Any]) -> None:
        """Own a fair share of the shards (outbox.ownership)."""
        self._next_rebalance = time.monotonic() + 1.0
        if _unsafe.disabled("shards"):  # fault injection: no ownership, see step()
            self._owned = set(range(self.num_shards))
            return
        released, gained, live = take_fair_share(self.store, conn, self._owned,
                                                 self.num_shards)
        for shard in released:
            self._cursor.pop(shard, None)
        if released or gained:
            if gained:
                self.store.set_owner(conn, gained, self.relay_id)
            log.info("relay %s owns shards %s (%d live relays)", self.relay_id,
                     ranges(sorted(self._owned)), live)
            self.metrics.shards(len(self._owned))

    # -- waiting ----------------------------------------------------------------------

    def _idle(self, conn: psycopg.Connection[Any]) -> None:
        """Nothing to send: tell writers to NOTIFY, check once more, then sleep."""
        shards = sorted(self._owned)
        self.store.set_waiting(conn, shards, True)
        try:
            if not self.store.has_pending(conn, shards):
                self._wait(conn, self.config.poll_interval)
        finally:
            self.store.set_waiting(conn, shards, False)

    def _wait(self, conn: psycopg.Connection[Any], timeout: float) -> None:
        if self._wake.is_set():
            self._wake.clear()
            return
        for _ in conn.notifies(timeout=timeout, stop_after=1):
            pass
        self._wake.clear()

    # -- connections ------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._owned = set()
        conn = psycopg.connect(
            libpq_url(self.config.db_url), autocommit=True, connect_timeout=5,
            application_name=f"outbox-relay {self.relay_id}"[:63],
        )
        try:
            lease_ms = int(self.config.lease_seconds * 1000)
            conn.execute(f"SET idle_session_timeout = {lease_ms}")
            conn.execute(f"SET statement_timeout = {max(lease_ms, 30000)}")
            conn.execute(f'LISTEN "{self.tables.channel}"')
            self.num_shards = self.store.shard_count(conn)
            shardcount.mismatch(self.config.num_shards, self.num_shards, "the relay")
            self.store.join(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._next_rebalance = 0.0
        return conn

    def _get_publisher(self) -> Publisher:
        if self._publisher is None:
            try:
                self._publisher = self._publisher_factory()
            except Exception as exc:
                raise _PublisherUnavailable(first_line(exc)) from exc
            self._throttle.recovered("kafka", f"relay {self.relay_id}: Kafka reachable again")
        return self._publisher

    def _replace_publisher(self) -> None:
        if self._publisher is not None:
            try:
                self._publisher.recover()
            except Exception:
                self._publisher = None  # made again, with backoff, by _get_publisher

    def _drop_connection(self) -> None:
        self._owned = set()
        self._cursor.clear()
        self._since = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def _grace_left(self) -> float:
        """Seconds of the shutdown grace left (unbounded while not stopping)."""
        return 3600.0 if self._stop_by is None else max(0.0, self._stop_by - time.monotonic())

    def _close(self) -> None:
        if self._publisher is not None:
            try:
                # Whatever is still unacknowledged stays in the outbox: no reason to wait
                # past the grace the operator gave.
                self._publisher.close(timeout=min(5.0, self._grace_left()))
            except Exception as exc:
                log.warning("relay %s: closing the producer: %s", self.relay_id, exc)
            self._publisher = None
        self._drop_connection()


class _PublisherUnavailable(Exception):
    pass


def _raise_if_permanent(exc: BaseException) -> None:
    """Waiting heals an outage, not a misconfiguration: stop, and say what is wrong."""
    reason = permanent_reason(exc)
    if reason is not None:
        raise ConfigError(reason) from exc


__all__ = ["Relay", "RelayConfig"]
