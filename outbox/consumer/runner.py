"""ConsumerRunner: polls a RecordSource and applies each event once, by composing the
consumer's parts (see the package docstring for the whole picture):

    source (transport seam) -> decode -> applier (one transaction per batch)
    -> dead-letter sink (after the commit) -> offsets committed -> partition states
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from outbox import _unsafe
from outbox._faults import crash_point
from outbox.consumer.api import AnyConsumer, AsyncIdempotentConsumer, IdempotentConsumer
from outbox.consumer.applier import BatchApplier
from outbox.consumer.calls import HandlerCalls, HandlerMisuse, Running
from outbox.consumer.config import ConsumerConfig, dead_letter_publisher, open_source
from outbox.consumer.db import Database
from outbox.consumer.deadletter import DeadLetterSink
from outbox.consumer.external import ExternalApplier
from outbox.consumer.finish import Finisher
from outbox.consumer.housekeeping import Housekeeping
from outbox.consumer.outcome import BatchFailed, Outcome, Parts, Retries, decode_batch
from outbox.consumer.partitions import Partitions, RebalanceNotes
from outbox.consumer.source import Batch, RecordSource, SourceUnavailable, TopicPartition
from outbox.consumer.watchdog import Watchdog
from outbox.diagnose import permanent_reason
from outbox.errors import ConfigError
from outbox.logs import fields
from outbox.metrics import ConsumerMetrics
from outbox.publisher import Publisher
from outbox.service import Outage, ServiceLoop

log = logging.getLogger("outbox.consumer")


@dataclass
class ConsumerStats:
    """Counts since the runner started (processed/duplicates/dead: committed batches only)."""

    processed: int = 0
    duplicates: int = 0
    failed: int = 0
    dead_lettered: int = 0
    malformed: int = 0
    batches: int = 0


class ConsumerRunner:
    """Polls Kafka and applies each event once through a consumer.

    `run()` loops until `stop()` (or SIGTERM/SIGINT after `install_signal_handlers()`);
    `run_once()` is one poll and its batch, then the chores that are due (purge, lag);
    `poll()` and `process(batch)` are its halves.
    Settings: a ConsumerConfig, or its fields as keywords (`db_url=`, `kafka=`...).
    `source` replaces the Kafka client (e.g. `outbox.testing.InMemoryBroker().source(g)`),
    `dead_letters` the dead-letter Publisher (an instance, or a function making one).
    """

    def __init__(self, consumer: AnyConsumer | type[AnyConsumer],
                 config: ConsumerConfig | None = None, *, source: RecordSource | None = None,
                 dead_letters: Publisher | Callable[[], Publisher] | None = None,
                 engine: sa.Engine | AsyncEngine | None = None,
                 session_factory: Callable[[], Session] | None = None,
                 metrics: ConsumerMetrics | None = None, **settings: Any) -> None:
        if isinstance(consumer, type):
            consumer = consumer()
        if not isinstance(consumer, IdempotentConsumer | AsyncIdempotentConsumer):
            raise ConfigError(f"{consumer!r} is not an IdempotentConsumer")
        cfg = replace(config, **settings) if config else ConsumerConfig.of(**settings)
        cfg.validate()
        self.config, self.consumer = cfg, consumer
        self.group_id = group = cfg.group_id or consumer.group_id
        consumer.validate(group)
        self.metrics = metrics or ConsumerMetrics(None)
        self.stats = ConsumerStats()
        self.db = Database(cfg, group_id=group, is_async=consumer.is_async, engine=engine,
                           session_factory=session_factory)
        self._given_source = source
        self.source: RecordSource | None = None
        self.partitions = Partitions()
        self.notes = RebalanceNotes(self.partitions, group,
                                    lambda tp: self.metrics.forget(tp.topic, tp.partition))
        self.loop = ServiceLoop(f"consumer {group}", log, backoff_base=0.5, backoff_max=5.0,
                                fields=fields(consumer_group=group))
        self.calls = HandlerCalls(consumer, external=consumer.external,
                                  idle_tx_timeout=cfg.idle_tx_timeout,
                                  handler_timeout=cfg.handler_timeout)
        self.retries = Retries(group, consumer.max_attempts, consumer.retry_backoff)
        kind = ExternalApplier if consumer.external else BatchApplier
        self.applier = kind(group=group, inbox=self.db.inbox, sessions=self.db.sessions,
                            calls=self.calls, retries=self.retries,
                            stopping=self.loop.stopped.is_set,
                            dedupe=lambda: not _unsafe.disabled("dedupe"))
        make = _publisher_factory(dead_letters, cfg)
        self.dead_letters = DeadLetterSink(make, suffix=consumer.dlq_suffix,
                                           timeout=cfg.dlq_timeout, group_id=group)
        self.finisher = Finisher(self)
        self.watchdog = Watchdog(group, self.calls, report_interval=cfg.hang_report_interval,
                                 shutdown_grace=cfg.shutdown_grace,
                                 handler_timeout=cfg.handler_timeout,
                                 on_timeout=self._timed_out)
        self.housekeeping = Housekeeping(self)
        self.housekeeping.schedule(self.loop)
        self._kafka_ok = self._db_ok = True

    # -- control ----------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the event in hand, commit what is done, and leave `run()`."""
        self.loop.stop()

    @property
    def stopping(self) -> bool:
        return self.loop.stopping

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the runner; one that has not stopped `shutdown_grace`
        seconds later (a handler that hangs) ends the process (see watchdog.py)."""
        def doing() -> str:
            running = self.calls.running
            return "committing what is done and stopping" + (
                f" (waiting up to {self.config.shutdown_grace:g} s for the handler for "
                f"{running})" if running is not None else "")

        self.loop.install_signal_handlers(doing, on_signal=self.watchdog.signalled)

    def healthy(self) -> bool:
        """Kafka and the database reachable, no partition stuck on a dead letter, and no
        handler call past handler_timeout."""
        return (self.source is not None and self._kafka_ok and self._db_ok
                and not self.partitions.stuck() and not self.watchdog.overdue())

    @property
    def held_partitions(self) -> dict[TopicPartition, int]:
        """Partitions waiting to retry a failed event: partition -> its offset."""
        return self.partitions.held()

    @property
    def kafka_consumer(self) -> Any:
        """The Kafka client's own consumer object (opened and subscribed on first use)."""
        return getattr(self._open(), "client", None)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        log.info("consumer %s (%s) starting on %s, topics %s, client %s", self.group_id,
                 type(self.consumer).__name__, self.db.where, list(self.consumer.topics),
                 self.config.client if self._given_source is None else
                 type(self._given_source).__name__, extra=self.loop.fields)
        self.watchdog.start()
        try:
            self.loop.run(self._step)
        finally:
            try:
                self.close()
            finally:
                self.watchdog.stop()
            s = self.stats
            log.info("consumer %s stopped: %d processed, %d duplicates skipped, %d failed "
                     "attempts, %d dead-lettered", self.group_id, s.processed, s.duplicates,
                     s.failed, s.dead_lettered, extra=self.loop.fields)

    def run_once(self, timeout: float | None = None) -> int:
        """Poll once and process the batch, then run the chores that are due; returns the
        number of records finished."""
        done = self._step(timeout)
        self.loop.run_chores(time.monotonic())
        return done

    def _step(self, timeout: float | None = None) -> int:
        batch = self.poll(timeout)
        return self.process(batch) if batch else 0

    def poll(self, timeout: float | None = None) -> Batch:
        source = self._open()
        self.notes.apply()
        self.partitions.release_due(time.monotonic())
        wait = self.config.poll_timeout if timeout is None else timeout
        due = self.partitions.next_due()
        if due is not None:
            wait = max(0.0, min(wait, due - time.monotonic()))
        try:
            batch = source.poll(wait, self.config.max_poll_records)
        except SourceUnavailable as exc:
            self._kafka_ok = False
            self._permanent(exc)
            if exc.reset:
                self._close_source()
            raise Outage("kafka", str(exc)) from exc
        if not self._kafka_ok:
            self._kafka_ok = True
            self.loop.recovered("kafka", "Kafka reachable again")
        self.notes.apply()
        return batch

    def process(self, batch: Batch) -> int:
        """Apply one poll batch: one transaction, the dead letters, the offset commit."""
        started = time.monotonic()
        parts = self._decode(batch)
        if not parts:
            return 0
        self.calls.slow = None
        try:
            out: Outcome = self.db.run(self.applier.apply, parts)
        except HandlerMisuse:
            self._rewind(parts)  # not committed: a caller that goes on sees it again
            raise
        except BatchFailed as exc:
            self._rewind(parts)
            self._batch_failed(exc)
        if not self._db_ok:
            self._db_ok = True
            self.loop.recovered("db", "database reachable again")
        if any(po.next_offset is not None for po in out.parts.values()):
            # the database transaction committed; the offsets are not committed yet
            crash_point("consumer.after_commit")
        return self.finisher.finish(out, started)

    def _decode(self, batch: Batch) -> Parts:
        held = self.partitions.held()
        for tp in [tp for tp in batch if tp in held]:  # paused, so this should not happen
            self._seek(tp, held[tp])  # stay at the hold
        return decode_batch({tp: rs for tp, rs in batch.items() if tp not in held},
                            self.consumer.id_header)

    def _rewind(self, parts: Parts) -> None:
        for tp, recs in parts:
            self._seek(tp, recs[0][0].offset)

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        if self.source is not None:
            self.source.seek(tp, offset)

    def _batch_failed(self, exc: BatchFailed) -> None:
        """Raise what a failed batch means: a misconfiguration (ConfigError), a handler
        slower than the database allows, or a database outage."""
        self._permanent(exc)
        slow = self.calls.explain(exc)
        if slow:
            raise Outage("handler", slow) from exc
        self._db_ok = False
        raise Outage("db", f"database unavailable ({exc}); the batch is retried") from exc

    def _permanent(self, exc: BaseException) -> None:
        """Raise ConfigError when `exc` cannot heal by waiting (missing tables, failed
        authentication, an option the Kafka client does not know...): an outage is
        retried, a misconfiguration stops the consumer with the reason."""
        reason = permanent_reason(exc)
        if reason:
            raise ConfigError(f"consumer {self.group_id} cannot run on {self.db.where}: "
                              f"{reason}") from exc

    def _timed_out(self, running: Running, error: str) -> None:
        """The watchdog's: the handler outlasted handler_timeout (one attempt, or for a
        batch call, its events marked as suspects)."""
        ids = [e.id for e in running.events]
        self.db.record_out_of_band(ids, error, 1 if len(ids) == 1 else 0)

    # -- the source and its rebalances ------------------------------------------------

    def _open(self) -> RecordSource:
        if self.source is not None:
            return self.source
        source = self._given_source or open_source(self.config, self.group_id)
        try:
            source.subscribe(list(self.consumer.topics), self.notes)
        except Exception as exc:
            self._permanent(exc)
            if isinstance(exc, SourceUnavailable):
                self._kafka_ok = False
                raise Outage("kafka", str(exc)) from exc
            raise
        self.loop.recovered("kafka", "Kafka reachable again")
        self.source = self.partitions.source = source
        return source

    # -- housekeeping -----------------------------------------------------------------

    def purge_inbox(self, max_batches: int = 20) -> int:
        """Delete this group's dedupe records older than the retention, in bounded
        batches (see outbox.consumer.housekeeping)."""
        return self.housekeeping.purge(max_batches)

    def update_lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition: end offset - position (what is left to consume)."""
        return self.housekeeping.lag()

    # -- resources --------------------------------------------------------------------

    def _close_source(self) -> None:
        source, self.source = self.source, None
        self.partitions.source = None
        self.partitions.clear()
        if source is not None:
            try:
                source.close()
            except Exception as exc:
                log.warning("consumer %s: closing the Kafka consumer: %s", self.group_id, exc)

    def close(self) -> None:
        try:
            self._close_source()
        finally:
            self.dead_letters.close()
            self.db.close()


def _publisher_factory(given: Publisher | Callable[[], Publisher] | None,
                       config: ConsumerConfig) -> Callable[[], Publisher]:
    """What makes the dead-letter Publisher: the client's own, or the one given."""
    if given is None:
        return lambda: dead_letter_publisher(config)
    if hasattr(given, "send"):
        return lambda: cast(Publisher, given)
    return given
