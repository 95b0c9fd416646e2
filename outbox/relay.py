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
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from outbox import _unsafe
from outbox.at_least_once import AtLeastOnce
from outbox.backoff import first_line
from outbox.cursors import Cursors
from outbox.dburl import mask
from outbox.diagnose import permanent_reason
from outbox.errors import ConfigError
from outbox.exactly_once import TxnSender, namespace
from outbox.logs import fields
from outbox.metrics import RelayMetrics
from outbox.ownership import ranges, take_fair_share
from outbox.producer_slot import ProducerSlot, ProducerUnavailable
from outbox.progress import ProgressLog
from outbox.publisher import Publisher
from outbox.reclaim import MB, Reclaimer
from outbox.relay_config import RelayConfig
from outbox.relay_session import open_session
from outbox.schema import make_tables
from outbox.sending import Sender
from outbox.service import Outage, ServiceLoop
from outbox.store import Store
from outbox.txn import Fenced, TxnProducer

log = logging.getLogger("outbox.relay")


class Relay:
    """Publishes the outbox of one database to Kafka, for the shards it owns."""

    def __init__(self, config: RelayConfig, publisher: Callable[[], Publisher],
                 metrics: RelayMetrics | None = None, *,
                 transactions: Callable[[str], TxnProducer] | None = None,
                 progress: ProgressLog | None = None) -> None:
        """`transactions` (a transactional id -> producer) and `progress` are the
        exactly-once mode's (config.exactly_once); `publisher` is the default mode's."""
        self.config = config
        self.tables = make_tables(config.table_prefix)
        self.store = Store(self.tables)
        self.relay_id = config.relay_id or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self.metrics = metrics or RelayMetrics(None)
        self.producer = ProducerSlot(
            publisher, lambda: self.loop.recovered("kafka", "Kafka reachable again"))
        self._conn: psycopg.Connection[Any] | None = None
        self._owned: set[int] = set()
        self.num_shards = 0  # read from the database on connecting
        self.loop = ServiceLoop(f"relay {self.relay_id}", log,
                                backoff_base=config.retry_base, backoff_max=5.0,
                                fields=fields(relay_id=self.relay_id))
        self.loop.on_stop(self._stopping)
        self._stop_by: float | None = None  # when stop() was called, plus the grace
        self._wake = threading.Event()
        self._next_rebalance = 0.0
        self._next_purge = 0.0
        self.sender = Sender(self.relay_id, config, self.store, self.metrics,
                             self.loop.throttle, self._grace_left, lambda: self.loop.stopping)
        self.cursors = Cursors(self.store)
        self.reclaimer = Reclaimer(self.tables, int(config.reclaim_above_mb * MB)
                                   if config.reclaim_above_mb else None)
        self.default = AtLeastOnce(self.sender, self.producer, self.cursors)
        self.txn: TxnSender | None = None
        if config.exactly_once:
            if transactions is None or progress is None:
                raise ConfigError("exactly-once needs a transactional producer factory "
                                  "and a progress log")
            self.txn = TxnSender(self.sender, transactions, progress,
                                 config.txn_namespace or namespace(config.db_url,
                                                                   config.table_prefix),
                                 self.cursors)
        self.published = 0

    # -- control ----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the relay to finish (or abandon, after the grace period) its batch and exit."""
        self.loop.stop()

    def _stopping(self) -> None:
        self._stop_by = time.monotonic() + self.config.shutdown_grace
        self._wake.set()

    def wake(self) -> None:
        """Skip the current wait (the in-process wake-up after a local commit)."""
        self._wake.set()

    def install_signal_handlers(self) -> None:
        self.loop.install_signal_handlers(lambda: "finishing the batch in flight")

    def healthy(self) -> bool:
        """For /healthz: the relay holds its database session (and so its shards)."""
        return self._conn is not None and not self._conn.closed

    @property
    def owned_shards(self) -> list[int]:
        return sorted(self._owned)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        log.info("relay %s starting on %s", self.relay_id, mask(self.config.db_url),
                 extra=self.loop.fields)
        try:
            self.loop.run(self._service_step)
        finally:
            self._close()
            log.info("relay %s stopped after publishing %d events", self.relay_id,
                     self.published, extra=self.loop.fields)

    def _service_step(self) -> None:
        """`step`, with an outage turned into `Outage` for the service loop's backoff."""
        try:
            self.step(wait=True)
        except psycopg.Error as exc:
            self._drop_connection()
            _raise_if_permanent(exc)
            # The cycle was abandoned with sends perhaps still in flight; the next owner
            # resends them. A fresh producer keeps those stragglers from landing among
            # (or, after a failure, ahead of) the new sends.
            self.producer.replace()
            raise Outage("db", f"database unavailable ({first_line(exc)})") from exc
        except ProducerUnavailable as exc:
            _raise_if_permanent(exc)
            raise Outage("kafka", f"Kafka unavailable ({exc})") from exc
        except Fenced as exc:  # another relay took a shard: our session must be gone
            self._drop_connection()
            raise Outage("fenced", f"fenced out of a shard ({exc}); rejoining") from exc

    def step(self, wait: bool) -> int:
        """One round: connect if needed, rebalance when due, publish one batch or wait."""
        conn = self._connection()
        self.loop.recovered("db", "database reachable again")
        if time.monotonic() >= self._next_rebalance:
            self._rebalance(conn)
        if not self._owned:
            if wait:
                self._wait(conn, self.config.poll_interval)
            return 0
        done = self._round(conn)
        if self.config.retention_seconds is not None and time.monotonic() >= self._next_purge:
            self.store.purge_published(conn, self.config.retention_seconds, 1000)
            self._next_purge = time.monotonic() + 5.0
        if done == 0 and wait:
            self.reclaimer.maybe(conn)
            self._idle(conn)
        return done

    def _round(self, conn: psycopg.Connection[Any]) -> int:
        """One round of the relay's mode over its shards; returns the events sent."""
        if self.txn is not None:
            settled = self.txn.round(conn, self._owned, self.num_shards)
        elif _unsafe.disabled("shards"):
            # Fault injection: the naive scale-out, relays sharing the table through
            # row locks (FOR UPDATE SKIP LOCKED held across the send) instead of shards.
            with conn.transaction():
                settled = self.default.round(conn, self._owned)
        else:
            settled = self.default.round(conn, self._owned)
        self.published += settled.acked
        return settled.sent

    # -- shards -----------------------------------------------------------------------

    def _rebalance(self, conn: psycopg.Connection[Any]) -> None:
        """Own a fair share of the shards (outbox.ownership)."""
        self._next_rebalance = time.monotonic() + 1.0
        if _unsafe.disabled("shards"):  # fault injection: no ownership, see step()
            self._owned = set(range(self.num_shards))
            return
        released, gained, live = take_fair_share(self.store, conn, self._owned,
                                                 self.num_shards)
        self.cursors.forget(released)
        if self.txn is not None and released:
            self.txn.let_go(released)
        if released or gained:
            if gained:
                self.store.set_owner(conn, gained, self.relay_id)
            log.info("relay %s owns shards %s (%d live relays)", self.relay_id,
                     ranges(sorted(self._owned)), live,
                     extra={**self.loop.fields, "shards": sorted(self._owned)})
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
        self._conn, self.num_shards = open_session(self.config, self.relay_id, self.store)
        self._next_rebalance = 0.0
        return self._conn

    def _drop_connection(self) -> None:
        if self.txn is not None:
            self.txn.let_go()  # owned again later, each shard fenced and checked anew
        self._owned = set()
        self.cursors.forget()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def _grace_left(self) -> float:
        """Seconds of the shutdown grace left (unbounded while not stopping)."""
        return 3600.0 if self._stop_by is None else max(0.0, self._stop_by - time.monotonic())

    def _close(self) -> None:
        self.producer.close(min(5.0, self._grace_left()), f"relay {self.relay_id}")
        self._drop_connection()
        if self.txn is not None:
            self.txn.close()


def _raise_if_permanent(exc: BaseException) -> None:
    """Waiting heals an outage, not a misconfiguration: stop, and say what is wrong."""
    reason = permanent_reason(exc)
    if reason is not None:
        raise ConfigError(reason) from exc


__all__ = ["Relay", "RelayConfig"]
