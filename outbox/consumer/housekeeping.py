"""The runner's periodic chores, between batches: purging old dedupe records (and the
attempts of events never seen again), and measuring lag for the metrics."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import sqlalchemy as sa

from outbox.backoff import Throttled, first_line
from outbox.consumer.source import TopicPartition
from outbox.logs import fields
from outbox.service import ServiceLoop

if TYPE_CHECKING:
    from outbox.consumer.runner import ConsumerRunner

log = logging.getLogger("outbox.consumer")


class Housekeeping:
    def __init__(self, runner: ConsumerRunner) -> None:
        self.r = runner
        self.throttle = Throttled(log, fields=fields(consumer_group=runner.group_id))

    def schedule(self, loop: ServiceLoop) -> None:
        """Register the chores with the runner's service loop."""
        loop.every(self.r.config.purge_interval, self.purge)
        if self.r.metrics.on:
            loop.every(self.r.config.lag_interval, self.lag)

    def purge(self, max_batches: int = 20) -> int:
        """Delete the group's dedupe records (and attempts) older than the retention, in
        bounded batches. Returns the number of dedupe records purged."""
        r = self.r
        limit = r.config.purge_batch
        retention = r.consumer.retention_seconds

        def purge(table: str) -> int:
            with r.db.sessions() as session, session.begin():
                return int(r.db.inbox.purge(session.connection(), r.group_id, retention,
                                            limit, table))
        total = 0
        try:
            for table in ("inbox", "attempts"):
                for _ in range(max_batches):
                    n = r.db.run(purge, table)
                    total += n if table == "inbox" else 0
                    if n < limit:
                        break
        except sa.exc.SQLAlchemyError as exc:
            r._permanent(exc)
            self.throttle.warn("purge", f"consumer {r.group_id}: inbox purge failed "
                               f"({first_line(exc)})")
        if total:
            log.info("consumer %s: purged %d dedupe records older than %.0fs", r.group_id,
                     total, retention)
        return total

    def lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition: end offset - position (what is left to consume)."""
        r = self.r
        if r.source is None:
            return {}
        try:
            lags = r.source.lag()
        except Exception as exc:
            log.debug("consumer %s: lag not updated: %s", r.group_id, exc)
            return {}
        r.metrics.lag({(tp.topic, tp.partition): n for tp, n in lags.items()})
        return lags
