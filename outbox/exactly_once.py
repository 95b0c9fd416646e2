"""The exactly-once relay's sends (`outbox relay --exactly-once`): Kafka transactions,
fenced per shard.

Producers: one transactional producer per owned shard, with the transactional id
`outbox-<namespace>-shard-<n>` (the namespace is `<database>.<table prefix>` unless
given), made when the relay takes the shard and closed when it lets it go. One per
shard, not one per relay, because fencing must follow ownership: the relay that takes
a shard initializes that shard's id, which bumps its epoch and aborts what the previous
owner left open, and a zombie owner (paused past its lease, then resumed) fails with
`Fenced` on that shard and can commit nothing more there. A relay-wide id would fence
whole relays, not shards, and could not be handed over shard by shard. The cost is one
producer (a few connections, librdkafka or kafka-python threads) per owned shard; a
relay owns `shards / relays` of them.

Each cycle, per shard with events: begin, send its events in order, send its progress
record (outbox.progress), commit; then delete what committed. A shard never begins its
next transaction before the rows of the previous one are deleted, so its last progress
record names every row Kafka holds and the outbox still might: taking a shard, a relay
reads that record and deletes those rows (unless `OUTBOX_UNSAFE_DISABLE=progress`).

Failures: a transaction that fails (a send refused, a timeout, the broker aborting it
past `transaction.timeout.ms`, which the relay sets to its lease) is aborted and its
events sent again from the first. The failing event gets an attempt, as without the
flag. A permanent error makes the shard a suspect: its head is then sent alone in a
transaction, and only an event refused alone is dead-lettered, so a dead letter never
entered a committed transaction.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from outbox import _unsafe, tracing
from outbox._faults import crash_point
from outbox.backoff import first_line
from outbox.cursors import Cursors, full_shards
from outbox.errors import ConfigError
from outbox.producer_slot import ProducerUnavailable
from outbox.progress import ProgressLog
from outbox.publisher import Delivery
from outbox.sending import Sender, Settled
from outbox.store import Claim, Row
from outbox.txn import Fenced, OpenTransaction, TxnFailed, TxnProducer, is_fenced

log = logging.getLogger("outbox.relay")
ROUND_BATCHES = 16  # a round claims at most this many --batch-size batches over its shards
ROUND_CYCLES = 4  # cycles a round may chain, each claimed while the one before commits
BLOCKED_RETRY = 30.0  # seconds a shard whose progress partition had a transaction open waits


def namespace(db_url: str, table_prefix: str) -> str:
    """The default name of an outbox on a Kafka cluster, `<database>.<table prefix>`:
    its transactional ids and progress topic must not be shared with another outbox
    (one would fence the other, and read the other's progress)."""
    from outbox.dburl import parse

    name = f"{parse(db_url).database or 'db'}.{table_prefix}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200]


def transactional_id(ns: str, shard: int) -> str:
    return f"outbox-{ns}-shard-{shard}"


class TxnSender:
    """Sends each owned shard's events in Kafka transactions; see the module docstring."""

    def __init__(self, sender: Sender, make_producer: Callable[[str], TxnProducer],
                 progress: ProgressLog, namespace: str, cursors: Cursors) -> None:
        self.sender = sender  # its failure accounting and suspects are shared
        self.relay_id = sender.relay_id
        self.config = sender.config
        self.store = sender.store
        self.make_producer = make_producer
        self.progress = progress
        self.namespace = namespace
        self.cursors = cursors
        self.producers: dict[int, TxnProducer] = {}
        self.suspects = sender.suspects
        # flush, then commit, each at most this long: with a heartbeat before each shard,
        # the session is never idle past the lease while Kafka is slow
        self.timeout = sender.config.lease_seconds / 3
        self._prepared = False
        self._pool: ThreadPoolExecutor | None = None  # commits the shards' transactions
        # shards left alone until then: their progress partition had a transaction open
        # (OpenTransaction); trying again costs an initialization and a wait each time
        self.blocked: dict[int, float] = {}

    # -- shards taken and let go -----------------------------------------------------

    def take(self, conn: psycopg.Connection[Any], shards: list[int], num_shards: int) -> None:
        """Fence each shard's previous owner and delete the rows its last committed
        transaction carried. The producers are made together (each initialization is a
        round trip to the transaction coordinator, which may wait for the previous
        owner's transaction to end), while the session is kept alive."""
        now = time.monotonic()
        shards = [s for s in shards if self.blocked.get(s, 0.0) <= now]
        if not shards:
            return
        if not self._prepared:
            self.progress.prepare(num_shards)
            self._prepared = True
        heartbeat = self.config.lease_seconds / 3
        with ThreadPoolExecutor(max_workers=min(8, len(shards)),
                                thread_name_prefix="outbox-take") as pool:
            made = {shard: pool.submit(self.make_producer,
                                       transactional_id(self.namespace, shard))
                    for shard in shards}
            while futures.wait(list(made.values()), timeout=heartbeat).not_done:
                conn.execute("SELECT 1")
        failed: BaseException | None = None
        for shard, future in made.items():
            if future.exception() is not None:
                failed = failed or future.exception()
                continue
            producer = future.result()
            try:
                conn.execute("SELECT 1")  # each progress read may take a moment
                self._settle_previous(conn, shard)
            except OpenTransaction as exc:
                producer.close(1.0)
                self.blocked[shard] = time.monotonic() + BLOCKED_RETRY
                self.sender.throttle.warn(
                    f"open{shard}", f"relay {self.relay_id}: shard {shard} not taken, "
                    f"tried again in {BLOCKED_RETRY:.0f}s: {exc}", shard=shard)
                continue
            except BaseException:
                producer.close(1.0)
                for later, f in made.items():  # close the ones not registered yet
                    if later > shard and f.exception() is None:
                        f.result().close(1.0)
                raise
            self.producers[shard] = producer  # only now: its progress was checked
            self.blocked.pop(shard, None)
        if failed is not None:
            raise failed

    def _settle_previous(self, conn: psycopg.Connection[Any], shard: int) -> None:
        """Delete the rows the shard's last committed transaction carried (they were
        committed by the previous owner, or by us before a failed commit's answer)."""
        if _unsafe.disabled("progress"):  # fault injection: resend what Kafka holds
            return
        done = self.progress.last(shard, keepalive=lambda: conn.execute("SELECT 1"))
        if done:
            gone = self.store.acknowledge_exact(
                conn, done, keep=self.config.retention_seconds is not None)
            if gone:
                log.info("relay %s: shard %d: %d events were already committed to Kafka; "
                         "removed, not sent again", self.relay_id, shard, gone,
                         extra={**self.sender.throttle.fields, "shard": shard})

    def let_go(self, shards: list[int] | None = None) -> None:
        """The relay no longer owns `shards` (all when None): close their producers."""
        for shard in list(self.producers) if shards is None else shards:
            self.suspects.discard(shard)
            self._reset(shard)

    def _reset(self, shard: int) -> None:
        """Close the shard's producer; an open transaction is left for the next
        initialization of its id (the next `take`, here or elsewhere) to abort."""
        producer = self.producers.pop(shard, None)
        if producer is not None:
            try:
                producer.close(1.0)
            except Exception as exc:
                log.debug("relay %s: closing the producer of shard %d: %s", self.relay_id,
                          shard, exc)

    def close(self) -> None:
        self.let_go()
        self.progress.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # -- a round ---------------------------------------------------------------------

    def round(self, conn: psycopg.Connection[Any], owned: set[int], num_shards: int) -> Settled:
        """The relay's round in this mode: producers for newly owned shards (fencing
        their previous owners), a claim over the shards that have one, the cycle."""
        self.let_go(sorted(set(self.producers) - owned))
        try:
            self.take(conn, sorted(owned - set(self.producers)), num_shards)
        except (ConfigError, psycopg.Error, Fenced):
            raise
        except Exception as exc:  # Kafka cannot be used now (made again next round)
            raise ProducerUnavailable(first_line(exc)) from exc
        shards = sorted(owned & set(self.producers))
        # A transaction's commit costs round trips to the coordinator and a marker per
        # partition, paid per transaction, not per event: split over the shards as the
        # default relay's batch is, transactions were too small (about 60 events at the
        # defaults). So each may carry up to --batch-size, within a round of at most
        # ROUND_BATCHES batches in all (memory, and the round's length).
        per_shard = max(1, min(self.config.batch_size,
                               ROUND_BATCHES * self.config.batch_size // max(1, len(shards))))
        first = self.cursors.claim(conn, shards, per_shard)
        if not first.rows and not self.suspects:
            self.sender.metrics.backlog_empty()
            return Settled()
        claim: Claim | None = first
        out = Settled()
        cycles = 0
        # Up to ROUND_CYCLES cycles: while one commits, the next events of the shards
        # it filled are claimed (see cycle); a cycle that leaves anything unsettled
        # (a failure, a suspect) ends the round.
        while (claim is not None and (claim.rows or self.suspects) and cycles < ROUND_CYCLES
               and not (cycles and self.sender.stopping())):
            started = time.monotonic()
            with tracing.send_span(claim.rows, self.relay_id):
                chain = cycles + 1 < ROUND_CYCLES and not self.sender.stopping()
                settled, claim = self._cycle(conn, claim.rows, claim if chain else None,
                                             per_shard)
            cycles += 1
            self.cursors.acked(settled.heads)
            self.sender.metrics.batch(time.monotonic() - started, settled.acked)
            out.acked += settled.acked
            out.sent += settled.sent
            out.heads.update(settled.heads)
        return out

    def cycle(self, conn: psycopg.Connection[Any], rows: list[Row]) -> Settled:
        """One transaction per shard in `rows` (claimed, in order per shard), then the
        deletes. Raises Fenced if a shard was taken from under the relay."""
        return self._cycle(conn, rows, None, 0)[0]

    def _cycle(self, conn: psycopg.Connection[Any], rows: list[Row], claim: Claim | None,
               per_shard: int) -> tuple[Settled, Claim | None]:
        """`cycle`; with the `claim` the rows came from, the next events of the shards it filled are
        claimed while the transactions commit (on a worker thread: PostgreSQL reads while
        Kafka commits), checked against that claim's snapshot as every pipelined claim is
        (docs/design.md, "Cursors"). They are returned for the next cycle, which begins
        its transactions only after this cycle's deletes; only the shards that committed
        their whole slice keep theirs. None when nothing was claimed or a shard is left
        unsettled (a failure, a suspect): the round ends there."""
        by_shard: dict[int, list[Row]] = {}
        for row in rows:
            if row.shard not in self.suspects:
                by_shard.setdefault(row.shard, []).append(row)
        # a shard's events stop at its first one waiting for a retry
        sends = {s: sent for s, rs in by_shard.items() if (sent := _until_backing_off(rs))}
        for shard in sorted(self.suspects & set(self.producers)):
            head = self.store.claim(conn, [shard], 1).rows
            self.suspects.discard(shard)
            if head and not head[0].backing_off:
                sends[shard] = head[:1]
                isolated = {shard}
                break
        else:
            isolated = set()
        started: dict[int, tuple[list[tuple[Row, Delivery]], Delivery]] = {}
        for shard, shard_rows in sends.items():
            try:
                started[shard] = self._begin(shard, shard_rows)
            except Fenced:
                self.let_go([shard])
                raise
            except TxnFailed as exc:  # the producer is in a bad state: made again next cycle
                self._reset(shard)
                self.sender.throttle.warn(f"txn{shard}", f"relay {self.relay_id}: could not "
                                          f"begin shard {shard}'s transaction ({exc})")
        crash_point("relay.after_send")
        out = Settled(sent=sum(len(b) for b, _ in started.values()))
        full = ([] if claim is None or claim.snapshot is None or isolated
                else [s for s in full_shards(rows, per_shard) if s in started])
        nxt: Claim | None = None
        if full and claim is not None and claim.snapshot is not None:
            last = {shard: batch[-1][0].position for shard, (batch, _) in started.items()}
            ended, nxt = self.cursors.claim_next_during(
                conn, full, per_shard, last, claim.snapshot,
                meanwhile=lambda: self._finish_all(conn, started))
        else:
            ended = self._finish_all(conn, started)
        acked: list[int] = []
        fenced: Fenced | None = None
        for shard, (batch, _) in started.items():
            try:
                if self._outcome(conn, shard, batch, ended[shard], shard in isolated):
                    acked.extend(row.position for row, _ in batch)
                    out.heads[shard] = batch[-1][0].position
            except Fenced as exc:
                fenced = fenced or exc
        if acked:  # also when another shard was fenced: what committed is deleted first
            crash_point("relay.after_ack")
            self.store.acknowledge(conn, acked, keep=self.config.retention_seconds is not None)
        out.acked = len(acked)
        if fenced is not None:
            raise fenced
        if nxt is None or self.suspects or any(s not in out.heads for s in started):
            return out, None
        go_on = {s for s in full if s in out.heads}
        return out, nxt._replace(rows=[r for r in nxt.rows if r.shard in go_on])

    def _begin(self, shard: int,
               rows: list[Row]) -> tuple[list[tuple[Row, Delivery]], Delivery]:
        """Begin the shard's transaction and send its events and its progress record."""
        producer = self.producers[shard]
        producer.begin()
        batch = [(row, producer.send(row.topic, row.key, row.value, row.headers))
                 for row in rows]
        done = [(row.position, row.event_id) for row, _ in batch]
        return batch, self.progress.record(producer, shard, done, self.relay_id)

    def _finish_all(self, conn: psycopg.Connection[Any],
                    started: dict[int, tuple[list[tuple[Row, Delivery]], Delivery]]
                    ) -> dict[int, BaseException | None]:
        """Flush and commit every shard's transaction at once, on the pool's threads
        (each commit is a round trip to the coordinator; one after the other they would
        add up per cycle), keeping the session alive meanwhile. Per shard: None when it
        committed, else the error."""
        if not started:
            return {}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="outbox-txn")
        pending = {shard: self._pool.submit(self._finish, shard, batch, progress)
                   for shard, (batch, progress) in started.items()}
        while futures.wait(list(pending.values()), timeout=self.timeout).not_done:
            conn.execute("SELECT 1")
        return {shard: f.exception() for shard, f in pending.items()}

    def _finish(self, shard: int, batch: list[tuple[Row, Delivery]],
                progress: Delivery) -> None:
        """Commit the shard's transaction once every record of it is acknowledged (never
        with one missing: kafka-python was seen committing a transaction whose record had
        expired, which loses that event). Raises TxnFailed or Fenced if it did not."""
        producer = self.producers[shard]
        producer.flush(self.timeout)
        missing = sum(1 for _, d in batch if not d.done() or d.error() is not None)
        missing += not progress.done() or progress.error() is not None
        if missing:
            raise TxnFailed(f"{missing} records of the transaction not acknowledged")
        producer.commit(self.timeout)

    def _commit(self, conn: psycopg.Connection[Any], shard: int,
                batch: list[tuple[Row, Delivery]], progress: Delivery,
                isolated: bool) -> bool:
        """`_finish` and `_outcome` for one shard, on this thread."""
        try:
            self._finish(shard, batch, progress)
            error: BaseException | None = None
        except (TxnFailed, Fenced) as exc:
            error = exc
        return self._outcome(conn, shard, batch, error, isolated)

    def _outcome(self, conn: psycopg.Connection[Any], shard: int,
                 batch: list[tuple[Row, Delivery]], error: BaseException | None,
                 isolated: bool) -> bool:
        """True when the shard's transaction committed. When it did not, the first
        refused event is accounted for (an attempt, a suspect, a dead letter) and the
        producer is dropped: the next cycle makes it again, which aborts what is open
        and, like any takeover, reads the shard's progress first, so a commit that went
        through after all (a time-out on its answer) is never sent twice. Raises Fenced
        when another relay holds the shard's id."""
        if error is None:
            return True
        if isinstance(error, Fenced):
            self.let_go([shard])
            raise error
        if not isinstance(error, TxnFailed):
            raise error  # not Kafka's answer: a bug, not to be taken for a failed commit
        self._reset(shard)
        failure = next(((row, e) for row, d in batch
                        if d.done() and (e := d.error()) is not None), None)
        if failure is not None and is_fenced(failure[1]):
            self.let_go([shard])
            raise Fenced(f"{type(failure[1]).__name__}: {failure[1]}") from error
        if failure is None:
            self.sender.throttle.warn(f"txn{shard}", f"relay {self.relay_id}: the "
                                      f"transaction of shard {shard} did not commit "
                                      f"({error}); sent again")
            return False
        self.sender.account(conn, failure[0], failure[1], isolated)
        return False


def _until_backing_off(rows: list[Row]) -> list[Row]:
    out = []
    for row in rows:
        if row.backing_off:
            break
        out.append(row)
    return out
