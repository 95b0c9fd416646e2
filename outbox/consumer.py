"""The idempotent consumer: exactly-once effects from at-least-once delivery.

    class Projector(IdempotentConsumer):
        topics = ["orders"]
        group_id = "order-projector"

        def handle(self, event: Event, session: Session) -> None:
            session.execute(...)            # the effects, in the batch's transaction

    runner = ConsumerRunner(Projector(), db_url=URL, kafka="localhost:9092")
    runner.install_signal_handlers()
    runner.run()                            # `outbox consume pkg.mod:Projector` does this

One poll batch is one database transaction:

1. every record is turned back into an Event (CloudEvents headers, the id from the
   consumer's `id_header`); one that cannot be (no id, undecodable payload) goes to the
   dead-letter topic at once;
2. one statement inserts the dedupe records (group, event id) of the whole batch
   (ON CONFLICT DO NOTHING): the ids it returns are new, the others were processed before
   -- so deduplication costs one round trip per batch, not per event;
3. per new event, in partition offset order: `handle`. The batch first runs without
   savepoints (they cost three round trips per event); if a handler raises, that
   transaction rolls back and the batch is redone with a savepoint per event, so the
   exception rolls back that event only, and counts as its attempt. The dedupe records
   of events the batch did not finish (failed, or held back behind a failure) are
   deleted again before the commit;
4. the transaction commits, and only then are the Kafka offsets of the finished records
   committed.

A crash before 4 loses the effects and the dedupe records together; a crash between the
database commit and the offset commit redelivers records whose dedupe records exist, so
they are skipped. Processing happens between polls, so a rebalance (which happens inside
poll) never takes a partition away mid-batch; an offset commit refused after one is
harmless for the same reason.

A failing event is retried with backoff, holding back only its own partition (seek back,
pause, resume after the delay); after `max_attempts` it goes to `<topic><dlq_suffix>`
with its error and origin in headers, is recorded as processed, and the partition moves
on. Dedupe records older than `inbox_retention` are purged, so a redelivery older than
that window is not deduplicated. A dead-letter copy the broker refuses for its size is
sent truncated (`truncated_dead_letter`); if even that is refused, the partition waits
and `healthy()` is False.

What stops the runner instead of being retried: a handler that commits, rolls back or
closes the session (HandlerMisuse, raised before anything of the batch is committed:
it is a programming error, and dead-lettering every event it touches would be worse),
and a database error that waiting cannot heal (ConfigError: missing tables, failed
authentication; see outbox.diagnose). A watchdog thread logs a handler that runs long;
after SIGTERM, a runner not stopped within `shutdown_grace` (a hung handler) ends the
process without committing its batch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import FrameType
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from outbox import _unsafe
from outbox._faults import crash_point
from outbox.backoff import Throttled, first_line, jitter
from outbox.dburl import mask, sqlalchemy_url
from outbox.diagnose import permanent_reason
from outbox.errors import ConfigError, InvalidTopic, MalformedRecord, OutboxError
from outbox.event import ID_HEADER, Event, from_record, validate_topic
from outbox.metrics import ConsumerMetrics
from outbox.schema import DEFAULT_PREFIX, make_tables
from outbox.serde import decode
from outbox.store import Store

log = logging.getLogger("outbox.consumer")

REASON_FAILED = "handler-failed"
REASON_MALFORMED = "malformed"
#: The headers a dead-lettered record gets on top of its own.
DLQ_HEADERS = ("outbox_error", "outbox_original_topic", "outbox_original_partition",
               "outbox_original_offset", "outbox_reason", "outbox_truncated",
               "outbox_original_size")
#: The dead-letter producer's request limit, far above Kafka's default message size
#: (1 MiB): a copy is the record plus the headers above, so it must be allowed to be
#: larger than any record its topic accepted. The dead-letter topic's own limit decides;
#: a copy the broker refuses is sent truncated (`truncated_dead_letter`).
DLQ_MAX_REQUEST_BYTES = 64 * 1024 * 1024
#: What a truncated copy keeps: the key up to this size, original headers up to these.
TRUNCATED_KEY_BYTES = 1024
TRUNCATED_HEADER_BYTES = 1024
TRUNCATED_HEADERS_TOTAL = 16 * 1024
RETRY_BACKOFF_MAX = 10.0
OUTAGE_BACKOFF_MAX = 5.0
#: Exit status of a process that did not stop within the shutdown grace after SIGTERM
#: (a hung handler): it ends without committing the batch in hand.
EXIT_NOT_STOPPED = 1
_OPTIONS = ("id_header", "max_attempts", "retry_backoff", "dlq_suffix", "external",
            "inbox_retention")


class HandlerMisuse(OutboxError, RuntimeError):
    """`handle` committed, rolled back or closed the session it was given (the runner owns
    its transaction). A programming error, not a bad event: the runner stops with it
    instead of dead-lettering every event the handler touches, and nothing of the batch
    is committed (in external mode, nothing of that event)."""


#: session.info keys of the guard: the transactions the runner owns while a handler runs,
#: and what the handler did to them.
_OWNED = "outbox.consumer.owned"
_MISUSE = "outbox.consumer.misuse"


def _refuse_commit(session: Session) -> None:
    """before_commit: while a handler runs, committing a transaction the runner owns
    raises at once, before anything reaches the database. The handler's own savepoints
    (`with session.begin_nested():`) commit as usual."""
    owned = session.info.get(_OWNED)
    if owned and (session.get_nested_transaction() or session.get_transaction()) in owned:
        session.info[_MISUSE] = "called session.commit()"
        raise HandlerMisuse("session.commit() inside a consumer's handle(): the runner "
                            "commits the batch's transaction itself, after the batch")


def _note_end(session: Session, transaction: SessionTransaction) -> None:
    """after_transaction_end: a transaction the runner owns ended while a handler ran
    (session.rollback() or close()). Nothing was committed; the runner refuses the batch."""
    owned = session.info.get(_OWNED)
    if owned and transaction in owned:
        session.info.setdefault(_MISUSE, "rolled back or closed the session")


def _guard(session: Session) -> None:
    if not sa.event.contains(session, "before_commit", _refuse_commit):
        sa.event.listen(session, "before_commit", _refuse_commit)
        sa.event.listen(session, "after_transaction_end", _note_end)


class IdempotentConsumer:
    """Subclass it: set `topics` and `group_id`, implement `handle(event, session)`.

    `handle` runs inside the batch's transaction, under a savepoint of its own; it must
    not commit or roll back the session. Whatever it writes through `session` commits
    together with the dedupe record, so each event's effects are applied once.

    Options (class attributes):
      id_header        where the event id is (`ce_id`; e.g. "id" for Debezium)
      max_attempts     handler attempts before the record is dead-lettered
      retry_backoff    first retry delay in seconds; doubles, with jitter, up to 10 s
      dlq_suffix       the dead-letter topic is `<topic><dlq_suffix>`
      external         for side effects outside the database: each event gets its own
                       transaction, and the dedupe record is written only after `handle`
                       returned (use `event.id` as the idempotency key downstream)
      inbox_retention  how long dedupe records are kept (timedelta or seconds)
    """

    topics: Sequence[str] = ()
    group_id: str = ""
    id_header: str = ID_HEADER
    max_attempts: int = 5
    retry_backoff: float = 0.2
    dlq_suffix: str = ".dlq"
    external: bool = False
    inbox_retention: timedelta | float = timedelta(days=7)

    def handle(self, event: Event, session: Session) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement handle(event, session)")

    @property
    def retention_seconds(self) -> float:
        r = self.inbox_retention
        return r.total_seconds() if isinstance(r, timedelta) else float(r)

    def validate(self, group_id: str | None = None) -> None:
        """Refuse a consumer that cannot run, naming what is wrong."""
        name = type(self).__name__
        topics = self.topics
        if isinstance(topics, str) or not topics:
            raise ConfigError(f"{name}.topics must be a non-empty list of topic names, "
                              f"got {topics!r}")
        try:
            for t in topics:
                validate_topic(t)
                validate_topic(t + (self.dlq_suffix if isinstance(self.dlq_suffix, str) else ""))
        except InvalidTopic as exc:
            raise ConfigError(f"{name}.topics (or its dead-letter topic): {exc}") from None
        group = group_id or self.group_id
        if not isinstance(group, str) or not group:
            raise ConfigError(f"{name}.group_id must be a non-empty str (or pass --group-id)")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(f"{name}.max_attempts must be an int >= 1, "
                              f"got {self.max_attempts!r}")
        if not isinstance(self.retry_backoff, int | float) or self.retry_backoff < 0:
            raise ConfigError(f"{name}.retry_backoff must be >= 0 seconds")
        if not isinstance(self.id_header, str) or not self.id_header:
            raise ConfigError(f"{name}.id_header must be a non-empty str")
        if not isinstance(self.dlq_suffix, str) or not self.dlq_suffix:
            raise ConfigError(f"{name}.dlq_suffix must be a non-empty str (the dead-letter "
                              "topic must differ from the topic)")
        if self.retention_seconds <= 0:
            raise ConfigError(f"{name}.inbox_retention must be positive")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} group={self.group_id!r} topics={list(self.topics)!r}>"


class FunctionConsumer(IdempotentConsumer):
    """What `@consumer(...)` makes of a plain `f(event, session)`; still callable as `f`."""

    def __init__(self, fn: Callable[[Event, Session], None], *, topics: Sequence[str],
                 group_id: str, **options: Any) -> None:
        self.fn = fn
        self.topics = list(topics)
        self.group_id = group_id
        for name, value in options.items():
            setattr(self, name, value)
        functools.update_wrapper(self, fn)

    def handle(self, event: Event, session: Session) -> None:
        self.fn(event, session)

    def __call__(self, event: Event, session: Session) -> None:
        self.fn(event, session)

    def __repr__(self) -> str:
        return (f"<consumer {getattr(self.fn, '__qualname__', self.fn)} "
                f"group={self.group_id!r} topics={list(self.topics)!r}>")


def idempotent_consumer(
    *, topics: Sequence[str], group_id: str, **options: Any
) -> Callable[[Callable[[Event, Session], None]], FunctionConsumer]:
    """Decorator form: `@consumer(topics=["orders"], group_id="g")` on `def f(event, session)`.

    Takes the IdempotentConsumer options as keywords (max_attempts=3, external=True...).
    The result is an IdempotentConsumer instance, usable as `outbox consume mod:f`.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown consumer option(s) {unknown}; known: {list(_OPTIONS)}")
    if isinstance(topics, str):
        raise ConfigError(f"topics must be a list of topic names, got the str {topics!r}")

    def wrap(fn: Callable[[Event, Session], None]) -> FunctionConsumer:
        made = FunctionConsumer(fn, topics=topics, group_id=group_id, **options)
        made.validate()
        return made

    return wrap


#: `from outbox.consumer import consumer` (the package exports it as `idempotent_consumer`,
#: because `outbox.consumer` is this module's name).
consumer = idempotent_consumer


def load_consumer(target: str) -> IdempotentConsumer:
    """`package.module:Name` -> an IdempotentConsumer (a subclass is instantiated)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"consumer {target!r} is not of the form package.module:ClassName")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"cannot import module {module_name!r} for consumer {target!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, type) and issubclass(obj, IdempotentConsumer):
        try:
            obj = obj()
        except Exception as exc:
            raise ConfigError(f"cannot instantiate {target}: {type(exc).__name__}: {exc}") \
                from exc
    if not isinstance(obj, IdempotentConsumer):
        raise ConfigError(
            f"{target} is {_describe(obj)}, not an IdempotentConsumer: point at a subclass of "
            "outbox.IdempotentConsumer or at a function decorated with @consumer(...)")
    return obj


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__name__}"
    if callable(obj):
        return f"the undecorated callable {getattr(obj, '__name__', obj)!r}"
    return f"a {type(obj).__name__}"


@dataclass
class ConsumerStats:
    """Counts since the runner started (processed/duplicates/dead: committed batches only)."""

    processed: int = 0
    duplicates: int = 0
    failed: int = 0
    dead_lettered: int = 0
    malformed: int = 0
    batches: int = 0


@dataclass
class _Hold:
    offset: int
    until: float


@dataclass
class _Outcome:
    commit: dict[Any, int] = field(default_factory=dict)  # partition -> next offset
    holds: dict[Any, _Hold] = field(default_factory=dict)
    rewind: dict[Any, int] = field(default_factory=dict)  # cut short by stop()
    processed: int = 0
    duplicates: int = 0
    dead: list[str] = field(default_factory=list)  # reasons


@dataclass
class _Running:
    """The handler call in progress (for the watchdog and for truthful error messages)."""

    event_id: uuid.UUID
    topic: str
    partition: int
    offset: int
    started: float

    def __str__(self) -> str:
        return f"event {self.event_id} ({self.topic}[{self.partition}] offset {self.offset})"


class _NeedSavepoints(Exception):
    """A handler failed on the fast path: redo the batch with a savepoint per event.

    Carries the failure (partition, offset, error) so the redo counts it as that
    record's attempt instead of calling the handler once more."""

    def __init__(self, failure: tuple[Any, int, Exception] | None = None) -> None:
        super().__init__()
        self.failure = failure


class _BatchFailed(Exception):
    """The database (or the connection to it) failed: nothing of the batch counts."""


class _Unavailable(Exception):
    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what


class _DeadLetterFailed(Exception):
    pass


class _CopyTooLarge(_DeadLetterFailed):
    """The client or the broker refused a dead-letter copy for its size."""


class _DeadLetterStuck(_DeadLetterFailed):
    """Even the truncated copy was refused for its size: waiting will not help until the
    dead-letter topic's limit is raised."""


Records = Mapping[Any, Sequence[Any]]


class ConsumerRunner:
    """Polls Kafka and applies each event once through an IdempotentConsumer.

    `run()` loops until `stop()` (or SIGTERM/SIGINT after `install_signal_handlers()`);
    `run_once()` is one poll and its batch, and `process(batch)` one batch, for tests.
    `hang_report_interval`: how often a handler still running is logged;
    `shutdown_grace`: how long after a signal the process may take to stop.
    """

    def __init__(
        self,
        consumer: IdempotentConsumer | type[IdempotentConsumer],
        *,
        kafka: str,
        db_url: str | None = None,
        engine: sa.Engine | None = None,
        session_factory: Callable[[], Session] | None = None,
        table_prefix: str = DEFAULT_PREFIX,
        group_id: str | None = None,
        max_poll_records: int = 500,
        poll_timeout: float = 0.5,
        session_timeout_ms: int | None = None,
        client_id: str | None = None,
        kafka_config: Mapping[str, Any] | None = None,
        metrics: ConsumerMetrics | None = None,
        purge_interval: float = 60.0,
        purge_batch: int = 1000,
        lag_interval: float = 10.0,
        dlq_timeout: float = 30.0,
        commit_timeout: float = 10.0,
        idle_tx_timeout: float | None = 60.0,
        shutdown_grace: float = 10.0,
        hang_report_interval: float = 10.0,
    ) -> None:
        if isinstance(consumer, type):
            consumer = consumer()
        if not isinstance(consumer, IdempotentConsumer):
            raise ConfigError(f"{consumer!r} is not an IdempotentConsumer")
        self.consumer = consumer
        self.group_id = group_id or consumer.group_id
        consumer.validate(self.group_id)
        if max_poll_records < 1:
            raise ConfigError("max_poll_records must be >= 1")
        if not shutdown_grace > 0 or not hang_report_interval > 0:
            raise ConfigError("shutdown_grace and hang_report_interval must be > 0 seconds")
        self.shutdown_grace = shutdown_grace
        self.hang_report_interval = hang_report_interval
        self.idle_tx_timeout = idle_tx_timeout
        self.kafka = kafka
        self.max_poll_records = max_poll_records
        self.poll_timeout = poll_timeout
        self.session_timeout_ms = session_timeout_ms
        self.client_id = client_id or f"outbox-consumer-{socket.gethostname()}-" \
                                      f"{uuid.uuid4().hex[:6]}"
        self.kafka_config = dict(kafka_config or {})
        if self.kafka_config.get("enable_auto_commit"):
            raise ConfigError("enable_auto_commit cannot be turned on: offsets are committed "
                              "after the database commit")
        self.metrics = metrics or ConsumerMetrics(None)
        self.purge_interval = purge_interval
        self.purge_batch = purge_batch
        self.lag_interval = lag_interval
        self.dlq_timeout = dlq_timeout
        self.commit_timeout = commit_timeout
        self.store = Store(make_tables(table_prefix))
        self._engine: sa.Engine | None = None
        if session_factory is None:
            if engine is None:
                if db_url is None:
                    raise ConfigError("ConsumerRunner needs db_url, engine or session_factory")
                connect_args: dict[str, Any] = {
                    "connect_timeout": 5,
                    "application_name": f"outbox-consumer {self.group_id}"[:63]}
                if idle_tx_timeout:
                    # A stalled consumer (SIGSTOP, hung call) must not keep its batch's
                    # dedupe records locked forever: the next owner's claim waits on them.
                    connect_args["options"] = (f"-c idle_in_transaction_session_timeout="
                                               f"{int(idle_tx_timeout * 1000)}")
                engine = self._engine = sa.create_engine(
                    sqlalchemy_url(db_url), pool_pre_ping=True, pool_size=2, max_overflow=2,
                    connect_args=connect_args)
            session_factory = sessionmaker(engine)
        self._sessions = session_factory
        self._where = mask(db_url) if db_url else repr(engine or session_factory)
        self.stats = ConsumerStats()
        self._kc: Any = None
        self._dlq: Any = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._revoked: set[Any] = set()
        self._holds: dict[Any, _Hold] = {}
        self._attempts: dict[tuple[Any, int], int] = {}
        self._throttle = Throttled(log)
        self._next_purge = 0.0
        self._next_lag = 0.0
        self._db_ok = True
        self._running: _Running | None = None  # the handler call in progress
        self._slow: tuple[_Running, float] | None = None  # a handler past idle_tx_timeout
        self._signalled_at: float | None = None
        self._stuck: dict[Any, int] = {}  # partition -> offset it cannot dead-letter

    # -- control ----------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the event in hand, commit what is done, and leave `run()`."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the runner; one that has not stopped `shutdown_grace`
        seconds later (a handler that hangs) ends the process, see `run()`."""
        def handler(signum: int, frame: FrameType | None) -> None:
            if self._signalled_at is None:
                self._signalled_at = time.monotonic()
            running = self._running
            log.info("consumer %s: signal %d, committing what is done and stopping%s",
                     self.group_id, signum,
                     f" (waiting up to {self.shutdown_grace:g} s for the handler for "
                     f"{running})" if running is not None else "")
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    @property
    def kafka_consumer(self) -> Any:
        """The kafka-python KafkaConsumer (made and subscribed on first use)."""
        return self._kafka()

    def healthy(self) -> bool:
        """Kafka and the database reachable, and no partition stuck on a dead letter."""
        return self._kc is not None and self._db_ok and not self._stuck

    @property
    def held_partitions(self) -> dict[Any, int]:
        """Partitions waiting to retry a failed event: partition -> its offset."""
        return {tp: h.offset for tp, h in self._holds.items()}

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        log.info("consumer %s (%s) starting on %s, topics %s", self.group_id,
                 type(self.consumer).__name__, self._where, list(self.consumer.topics))
        backoff = 0.5
        watching = threading.Event()
        threading.Thread(target=self._watch, args=(watching,), daemon=True,
                         name=f"outbox-consumer-watchdog-{self.group_id}").start()
        try:
            while not self._stop.is_set():
                try:
                    self.run_once()
                    backoff = 0.5
                except _Unavailable as exc:
                    self._throttle.warn(exc.what, f"consumer {self.group_id}: {exc}; "
                                        "retrying with backoff")
                    self._stop.wait(jitter(backoff))
                    backoff = min(backoff * 2, OUTAGE_BACKOFF_MAX)
        finally:
            try:
                self.close()
            finally:
                watching.set()
            s = self.stats
            log.info("consumer %s stopped: %d processed, %d duplicates skipped, %d failed "
                     "attempts, %d dead-lettered", self.group_id, s.processed, s.duplicates,
                     s.failed, s.dead_lettered)

    def _watch(self, done: threading.Event) -> None:
        """The watchdog thread of `run()`: says which handler has been running long, once
        per `hang_report_interval`, and ends the process when a stop signal has not been
        obeyed within `shutdown_grace` (a hung handler never returns to the loop)."""
        last: _Running | None = None
        next_report = self.hang_report_interval
        tick = min(1.0, self.hang_report_interval / 4)
        while True:
            wait = tick
            signalled = self._signalled_at
            if signalled is not None:
                wait = min(wait, max(0.01, signalled + self.shutdown_grace - time.monotonic()))
            if done.wait(wait):
                return
            now = time.monotonic()
            running = self._running
            if running is not last:
                last, next_report = running, self.hang_report_interval
            if running is not None and now - running.started >= next_report:
                log.warning("consumer %s: handler for %s has been running %.0f s; its "
                            "partition and the batch's transaction wait for it",
                            self.group_id, running, now - running.started)
                next_report += self.hang_report_interval
            if signalled is not None and now - signalled >= self.shutdown_grace:
                self._exit_not_stopped(running, now - signalled)

    def _exit_not_stopped(self, running: _Running | None, waited: float) -> None:
        """End the process now, as abruptly as SIGKILL: the open transaction dies with the
        connection, so the batch in hand is not committed (it is redelivered, and the
        dedupe records skip whatever an earlier commit applied)."""
        if running is not None:
            what = (f"the handler for {running} has been running "
                    f"{time.monotonic() - running.started:.0f} s; exiting without "
                    "committing its batch")
        else:
            what = "exiting; a batch not committed yet will be redelivered"
        log.error("consumer %s: not stopped %.0f s after the stop signal (shutdown grace "
                  "%g s): %s", self.group_id, waited, self.shutdown_grace, what)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(EXIT_NOT_STOPPED)

    def run_once(self, timeout: float | None = None) -> int:
        """Poll once and process the batch; returns the number of records finished."""
        batch = self.poll(timeout)
        done = self.process(batch) if batch else 0
        self._housekeeping()
        return done

    def poll(self, timeout: float | None = None) -> Records:
        kc = self._kafka()
        self._apply_revocations()
        self._resume_due()
        wait = self.poll_timeout if timeout is None else timeout
        if self._holds:
            wait = max(0.0, min(wait, min(h.until for h in self._holds.values())
                                - time.monotonic()))
        from kafka.errors import KafkaError

        try:
            batch: Records = kc.poll(timeout_ms=int(wait * 1000),
                                     max_records=self.max_poll_records)
        except KafkaError as exc:
            raise _Unavailable("kafka", f"Kafka unavailable ({first_line(exc)})") from exc
        self._apply_revocations()
        return batch

    def process(self, batch: Records) -> int:
        """Apply one poll batch: one transaction, then the offset commit."""
        started = time.monotonic()
        parts: list[tuple[Any, list[tuple[Any, Event | MalformedRecord]]]] = []
        for tp, records in batch.items():
            if not records:
                continue
            if tp in self._holds:  # paused, so this should not happen: stay at the hold
                self._seek(tp, self._holds[tp].offset)
                continue
            parts.append((tp, [(r, self._decode(r)) for r in sorted(records,
                                                                     key=lambda r: r.offset)]))
        if not parts:
            return 0
        self._slow = None
        try:
            out = self._process_external(parts) if self.consumer.external \
                else self._process_batch(parts)
        except HandlerMisuse:
            for tp, recs in parts:  # not committed: a caller that goes on sees it again
                self._seek(tp, recs[0][0].offset)
            raise
        except _BatchFailed as exc:
            for tp, recs in parts:
                self._seek(tp, recs[0][0].offset)
            self._permanent(exc)
            if self._slow is not None:
                running, took = self._slow
                raise _Unavailable(
                    "handler", f"the handler for {running} ran {took:.0f} s, longer than the "
                    f"database's idle_in_transaction_session_timeout ({self.idle_tx_timeout:g}"
                    " s), which ends a transaction left idle that long: most likely why the "
                    f"batch's connection was lost ({exc}); the batch is retried (make the "
                    "handler faster, or raise idle_tx_timeout)") from exc
            self._db_ok = False
            raise _Unavailable("db", f"database unavailable ({exc}); the batch is retried")\
                from exc
        if not self._db_ok:
            self._db_ok = True
            self._throttle.recovered("db", f"consumer {self.group_id}: database reachable again")
        for tp, offset in out.rewind.items():
            self._seek(tp, offset)
        for tp, hold in out.holds.items():
            self._seek(tp, hold.offset)
            with contextlib.suppress(Exception):
                self._kc.pause(tp)
            self._holds[tp] = hold
        if out.commit:
            # the database transaction committed; the offsets are not committed yet
            crash_point("consumer.after_commit")
        self._commit(out.commit)
        for tp, next_offset in out.commit.items():  # moved on without the dead letter
            if self._stuck.get(tp, next_offset) < next_offset:
                del self._stuck[tp]
        s = self.stats
        s.batches += 1
        s.processed += out.processed
        s.duplicates += out.duplicates
        s.dead_lettered += len(out.dead)
        s.malformed += out.dead.count(REASON_MALFORMED)
        self.metrics.batch(time.monotonic() - started, out.processed, out.duplicates, out.dead)
        return out.processed + out.duplicates + len(out.dead)

    # -- one batch --------------------------------------------------------------------

    def _decode(self, record: Any) -> Event | MalformedRecord:
        try:
            return from_record(topic=record.topic, key=record.key, value=record.value,
                               headers=record.headers or (), decode=decode,
                               id_header=self.consumer.id_header)
        except MalformedRecord as exc:
            return exc

    def _process_batch(self, parts: list[tuple[Any, list[tuple[Any, Any]]]]) -> _Outcome:
        """The fast path first: no savepoints, which cost three round trips per event.
        If any handler fails, that transaction rolls back whole and the batch is redone
        with a savepoint per event, so a failing event still rolls back only itself."""
        fast = not any(isinstance(e, MalformedRecord) for _, recs in parts for _, e in recs)
        failure = None
        if fast:
            try:
                return self._process_in_tx(parts, savepoints=False)
            except _NeedSavepoints as exc:
                failure = exc.failure
        return self._process_in_tx(parts, savepoints=True, failure=failure)

    def _process_in_tx(self, parts: list[tuple[Any, list[tuple[Any, Any]]]],
                       savepoints: bool,
                       failure: tuple[Any, int, Exception] | None = None) -> _Outcome:
        out = _Outcome()
        dedupe = not _unsafe.disabled("dedupe")
        try:
            with self._sessions() as session, session.begin():
                conn = self._raw(session)
                # One statement inserts the batch's dedupe records: what it returns is new;
                # anything else was processed before (a concurrent claim blocks until its
                # transaction ends, then counts as processed if it committed).
                claimed = self._claim(conn, parts) if dedupe else None
                finished: set[uuid.UUID] = set()
                self._walk(parts, out, lambda tp, record, event: self._one_in_tx(
                    session, conn, tp, record, event, claimed, finished, out, savepoints,
                    failure))
                if claimed:
                    unfinished = claimed - finished  # failed, held back or cut short
                    if unfinished:
                        self.store.unclaim_inbox(conn, self.group_id, sorted(unfinished))
        except (_BatchFailed, HandlerMisuse, _NeedSavepoints):
            raise
        except (sa.exc.SQLAlchemyError, psycopg.Error) as exc:
            if not savepoints and not _disconnect(exc):
                raise _NeedSavepoints from exc  # e.g. a flush at commit failed
            raise _BatchFailed(first_line(exc)) from exc
        return out

    def _walk(self, parts: list[tuple[Any, list[tuple[Any, Any]]]], out: _Outcome,
              one: Callable[[Any, Any, Any], bool]) -> None:
        """Each partition's records in offset order, until `one` says the partition must
        wait; a stopping runner rewinds what it did not reach."""
        for tp, recs in parts:
            if self._stop.is_set():
                out.rewind[tp] = recs[0][0].offset
                continue
            for record, event in recs:
                if self._stop.is_set():
                    out.rewind[tp] = record.offset
                    break
                if not one(tp, record, event):
                    break
                out.commit[tp] = record.offset + 1

    def _claim(self, conn: psycopg.Connection[Any],
               parts: list[tuple[Any, list[tuple[Any, Any]]]]) -> set[uuid.UUID]:
        ids = [e.id for _, recs in parts for _, e in recs if isinstance(e, Event)]
        return self.store.claim_inbox(conn, self.group_id, ids) if ids else set()

    def _one_in_tx(self, session: Session, conn: psycopg.Connection[Any], tp: Any,
                   record: Any, event: Event | MalformedRecord,
                   claimed: set[uuid.UUID] | None, finished: set[uuid.UUID],
                   out: _Outcome, savepoints: bool = True,
                   failure: tuple[Any, int, Exception] | None = None) -> bool:
        """True when the record is finished; False when its partition must wait."""
        if isinstance(event, MalformedRecord):
            return self._dead_letter(tp, record, REASON_MALFORMED, str(event), out, None)
        if claimed is not None and (event.id not in claimed or event.id in finished):
            out.duplicates += 1  # processed before, or earlier in this batch
            return True
        root = session.get_transaction()
        assert root is not None
        if not savepoints:
            try:
                self._call_handler(session, (root,), record, event)
            except HandlerMisuse:
                raise
            except Exception as exc:
                if _connection_lost(exc, conn):
                    raise _BatchFailed(first_line(exc)) from exc
                raise _NeedSavepoints((tp, record.offset, exc)) from exc
            finished.add(event.id)
            out.processed += 1
            self._attempts.pop((tp, record.offset), None)
            return True
        if failure is not None and failure[:2] == (tp, record.offset):
            # it failed on the fast path a moment ago: that was this attempt
            return self._failed(tp, record, event, failure[2], out,
                                lambda: finished.add(event.id))
        sp = session.begin_nested()
        # SQLAlchemy emits the SAVEPOINT lazily, at the session's next statement: make it
        # happen now, so whatever the handler does (even through the raw connection) is
        # inside it.
        session.connection()
        try:
            self._call_handler(session, (root, sp), record, event)
        except HandlerMisuse:
            raise
        except Exception as exc:
            self._rollback(sp, conn, exc)
            return self._failed(tp, record, event, exc, out, lambda: finished.add(event.id))
        try:
            sp.commit()  # flushes the handler's pending ORM changes, releases the savepoint
        except Exception as exc:
            self._rollback(sp, conn, exc)
            return self._failed(tp, record, event, exc, out, lambda: finished.add(event.id))
        finished.add(event.id)
        out.processed += 1
        self._attempts.pop((tp, record.offset), None)
        return True

    def _process_external(self, parts: list[tuple[Any, list[tuple[Any, Any]]]]) -> _Outcome:
        """One transaction per event; the dedupe record joins it after `handle` returned."""
        out = _Outcome()
        dedupe = not _unsafe.disabled("dedupe")
        try:
            if dedupe:
                with self._sessions() as session:
                    seen = self._seen(self._raw(session), parts)
            else:
                seen = set()
            self._walk(parts, out, lambda tp, record, event: self._one_external(
                tp, record, event, seen, dedupe, out))
        except (_BatchFailed, HandlerMisuse):
            raise
        except (sa.exc.SQLAlchemyError, psycopg.Error) as exc:
            raise _BatchFailed(first_line(exc)) from exc
        return out

    def _one_external(self, tp: Any, record: Any, event: Event | MalformedRecord,
                      seen: set[uuid.UUID], dedupe: bool, out: _Outcome) -> bool:
        if isinstance(event, MalformedRecord):
            return self._dead_letter(tp, record, REASON_MALFORMED, str(event), out, None)
        if event.id in seen:
            out.duplicates += 1
            return True
        with self._sessions() as session:
            conn = self._raw(session)
            root = session.get_transaction()
            assert root is not None
            try:
                self._call_handler(session, (root,), record, event)
                # Only now, after the handler succeeded: the dedupe record, in the same
                # transaction as the handler's own writes.
                fresh = not dedupe or self.store.mark_processed(conn, self.group_id, event.id)
                if fresh:
                    session.commit()
                else:
                    session.rollback()  # another consumer finished it first: keep its effects
            except HandlerMisuse:
                raise
            except Exception as exc:
                with contextlib.suppress(Exception):
                    session.rollback()
                if _connection_lost(exc, conn):
                    raise _BatchFailed(first_line(exc)) from exc
                return self._failed(tp, record, event, exc, out,
                                    lambda: self._mark_own_tx(event.id, dedupe))
        if dedupe:
            seen.add(event.id)
        if fresh:
            out.processed += 1
        else:
            out.duplicates += 1
        self._attempts.pop((tp, record.offset), None)
        return True

    def _call_handler(self, session: Session, owned: tuple[SessionTransaction, ...],
                      record: Any, event: Event) -> None:
        """`handle`, with the runner's transactions guarded against it and the call
        visible to the watchdog. Raises HandlerMisuse if the handler committed, rolled
        back or closed the session, even when it swallowed the refusal."""
        _guard(session)
        info = session.info
        info[_OWNED] = owned
        info.pop(_MISUSE, None)
        running = _Running(event.id, record.topic, record.partition, record.offset,
                           time.monotonic())
        self._running = running
        try:
            self.consumer.handle(event, session)
        except Exception as exc:
            if info.get(_MISUSE):
                raise self._misuse(info.pop(_MISUSE), running) from exc
            raise
        finally:
            self._running = None
            info.pop(_OWNED, None)
            self._ran(running)
        if info.get(_MISUSE):
            raise self._misuse(info.pop(_MISUSE), running)

    def _permanent(self, exc: BaseException) -> None:
        """Raise ConfigError when `exc` cannot heal by waiting (missing tables, failed
        authentication, a missing database...): an outage is retried, a misconfiguration
        stops the consumer with the reason (`outbox consume` exits non-zero)."""
        reason = permanent_reason(exc)
        if reason:
            raise ConfigError(f"consumer {self.group_id} cannot run on {self._where}: "
                              f"{reason}") from exc

    def _ran(self, running: _Running) -> None:
        """Note a handler call that outlasted idle_in_transaction_session_timeout: the
        database ends such a transaction, and the batch's failure is then reported as
        what it is, not as an outage."""
        took = time.monotonic() - running.started
        if self.idle_tx_timeout and took >= self.idle_tx_timeout:
            self._slow = (running, took)

    def _misuse(self, what: str, running: _Running) -> HandlerMisuse:
        scope = "this event" if self.consumer.external else "the batch"
        return HandlerMisuse(
            f"{type(self.consumer).__name__}.handle {what} on {running}: the runner owns the "
            "session's transaction and commits it itself (use session.flush() to get ids, "
            f"session.begin_nested() for a savepoint of your own). Nothing of {scope} was "
            "committed; the consumer stops")

    def _mark_own_tx(self, event_id: uuid.UUID, dedupe: bool) -> None:
        if dedupe:
            with self._sessions() as session, session.begin():
                self.store.mark_processed(self._raw(session), self.group_id, event_id)

    def _seen(self, conn: psycopg.Connection[Any],
              parts: list[tuple[Any, list[tuple[Any, Any]]]]) -> set[uuid.UUID]:
        ids = list({e.id for _, recs in parts for _, e in recs if isinstance(e, Event)})
        return self.store.already_processed(conn, self.group_id, ids) if ids else set()

    def _rollback(self, sp: SessionTransaction, conn: psycopg.Connection[Any],
                  exc: BaseException) -> None:
        """Roll back one event's savepoint; a lost connection fails the whole batch."""
        try:
            sp.rollback()
        except Exception as rb:
            raise _BatchFailed(f"{first_line(exc)}; then {first_line(rb)}") from exc
        if _connection_lost(exc, conn):
            raise _BatchFailed(first_line(exc)) from exc

    def _failed(self, tp: Any, record: Any, event: Event, exc: Exception, out: _Outcome,
                mark: Callable[[], None]) -> bool:
        key = (tp, record.offset)
        attempts = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempts
        self.stats.failed += 1
        self.metrics.failed()
        text = f"{type(exc).__name__}: {exc}"
        if attempts < self.consumer.max_attempts:
            delay = jitter(min(RETRY_BACKOFF_MAX,
                                self.consumer.retry_backoff * 2 ** (attempts - 1)))
            out.holds[tp] = _Hold(record.offset, time.monotonic() + delay)
            self._throttle.warn(
                f"handler {tp}", f"consumer {self.group_id}: handler failed on event "
                f"{event.id} ({record.topic}[{record.partition}] offset {record.offset}), "
                f"attempt {attempts}/{self.consumer.max_attempts}: {text}; the partition "
                f"retries in {delay:.2f}s")
            return False
        return self._dead_letter(tp, record, REASON_FAILED, text, out, mark)

    def _dead_letter(self, tp: Any, record: Any, reason: str, error: str, out: _Outcome,
                     mark: Callable[[], None] | None) -> bool:
        """Send to the dead-letter topic and wait for the ack, then record it as done."""
        topic = record.topic + self.consumer.dlq_suffix
        try:
            truncated = self._send_dead_letter(topic, record, reason, error)
        except _DeadLetterStuck as exc:
            # Loud, and red on /healthz: this needs an operator (a larger max.message.bytes
            # on the dead-letter topic). The partition retries now and then.
            out.holds[tp] = _Hold(record.offset, time.monotonic() + RETRY_BACKOFF_MAX)
            self._stuck[tp] = record.offset
            log.error("consumer %s: cannot dead-letter %s[%d] offset %d to %s, not even "
                      "truncated (%s); the partition is stuck until %s accepts the copy "
                      "(raise its max.message.bytes), and the health check is red",
                      self.group_id, record.topic, record.partition, record.offset, topic,
                      exc, topic)
            return False
        except _DeadLetterFailed as exc:
            delay = jitter(min(RETRY_BACKOFF_MAX, max(self.consumer.retry_backoff, 1.0)))
            out.holds[tp] = _Hold(record.offset, time.monotonic() + delay)
            self._throttle.warn("kafka", f"consumer {self.group_id}: cannot dead-letter "
                                f"{record.topic}[{record.partition}] offset {record.offset} "
                                f"to {topic} ({exc}); the partition waits")
            return False
        if mark is not None:
            mark()
        self._attempts.pop((tp, record.offset), None)
        if self._stuck.pop(tp, None) is not None:
            log.info("consumer %s: %s[%d] is no longer stuck", self.group_id, record.topic,
                     record.partition)
        out.dead.append(reason)
        log.error("consumer %s: %s[%d] offset %d dead-lettered to %s (%s%s): %s",
                  self.group_id, record.topic, record.partition, record.offset, topic, reason,
                  f"; too large, {truncated} truncated" if truncated else "", error)
        return True

    def _send_dead_letter(self, topic: str, record: Any, reason: str, error: str) -> str:
        """Send the copy and wait for the ack; if it is refused for its size, send a
        truncated copy. Returns what was truncated ("" for a whole copy)."""
        headers = dead_letter_headers(record.headers or (), topic=record.topic,
                                      partition=record.partition, offset=record.offset,
                                      reason=reason, error=error)
        try:
            self._send_copy(topic, record.key, record.value, headers)
            return ""
        except _CopyTooLarge as exc:
            refused = exc
        key, value, small = truncated_dead_letter(record.key, record.value, headers)
        log.warning("consumer %s: the dead-letter copy of %s[%d] offset %d is too large for %s "
                    "(%s); sending it truncated", self.group_id, record.topic,
                    record.partition, record.offset, topic, refused)
        try:
            self._send_copy(topic, key, value, small)
        except _CopyTooLarge as exc:
            raise _DeadLetterStuck(f"whole: {refused}; truncated: {exc}") from exc
        return dict(small)["outbox_truncated"].decode()

    def _send_copy(self, topic: str, key: bytes | None, value: bytes | None,
                   headers: list[tuple[str, bytes]]) -> None:
        from kafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

        too_large = (MessageSizeTooLargeError, RecordListTooLargeError)
        producer = self._dlq_producer()
        try:
            future = producer.send(topic, key=key, value=value, headers=headers)
        except too_large as exc:  # refused by the client, nothing was sent
            raise _CopyTooLarge(first_line(exc)) from exc
        except Exception as exc:
            self._close_dlq()
            raise _DeadLetterFailed(first_line(exc)) from exc
        try:
            future.get(timeout=self.dlq_timeout)
        except Exception as exc:
            # a fresh producer (and producer id) after any failed batch, refused for its
            # size or not, so no sequence number state of the failed one is carried on
            self._close_dlq()
            if isinstance(exc, too_large):
                raise _CopyTooLarge(first_line(exc)) from exc
            raise _DeadLetterFailed(first_line(exc)) from exc

    # -- Kafka ------------------------------------------------------------------------

    def _kafka(self) -> Any:
        if self._kc is not None:
            return self._kc
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        config: dict[str, Any] = {
            "bootstrap_servers": self.kafka.split(","),
            "client_id": self.client_id,
            "max_poll_records": self.max_poll_records,
            "bootstrap_timeout_ms": 5000,  # Kafka down at start: retry (and obey stop()) soon
            **self.kafka_config,
            "group_id": self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": self.kafka_config.get("auto_offset_reset", "earliest"),
        }
        if self.session_timeout_ms is not None:
            config["session_timeout_ms"] = self.session_timeout_ms
            config.setdefault("heartbeat_interval_ms", max(500, self.session_timeout_ms // 4))
        kc = None
        try:
            kc = KafkaConsumer(**config)
            kc.subscribe(topics=list(self.consumer.topics), listener=_listener(self))
        except Exception as exc:
            if kc is not None:  # not left to __del__ at interpreter exit
                with contextlib.suppress(Exception):
                    kc.close(autocommit=False, timeout_ms=1000)
            self._permanent(exc)
            if isinstance(exc, KafkaError):
                raise _Unavailable("kafka", f"Kafka unavailable ({first_line(exc)})") from exc
            raise
        self._throttle.recovered("kafka", f"consumer {self.group_id}: Kafka reachable again")
        self._kc = kc
        return kc

    def _dlq_producer(self) -> Any:
        if self._dlq is None:
            from kafka import KafkaProducer

            try:
                producer = KafkaProducer(
                    bootstrap_servers=self.kafka.split(","), client_id=f"{self.client_id}-dlq",
                    enable_idempotence=True, acks="all", linger_ms=0,
                    max_in_flight_requests_per_connection=5, bootstrap_timeout_ms=5000,
                    max_block_ms=int(self.dlq_timeout * 1000),
                    max_request_size=DLQ_MAX_REQUEST_BYTES)
            except Exception as exc:
                raise _DeadLetterFailed(first_line(exc)) from exc
            if not producer.config.get("enable_idempotence"):
                producer.close(timeout=1)
                raise ConfigError("kafka-python disabled idempotence on the dead-letter producer")
            self._dlq = producer
        return self._dlq

    def _close_dlq(self) -> None:
        if self._dlq is not None:
            from outbox.publisher import close_producer

            close_producer(self._dlq, timeout=2)  # closes it even with records pending
            self._dlq = None

    def _seek(self, tp: Any, offset: int) -> None:
        try:
            self._kc.seek(tp, offset)
        except Exception as exc:  # no longer assigned: the new owner starts from the commit
            log.debug("consumer %s: seek %s to %d: %s", self.group_id, tp, offset, exc)

    def _commit(self, offsets: dict[Any, int]) -> None:
        if not offsets:
            return
        from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError
        from kafka.structs import OffsetAndMetadata

        try:
            self._kc.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()},
                            timeout_ms=int(self.commit_timeout * 1000))
        except (CommitFailedError, RebalanceInProgressError) as exc:
            log.warning("consumer %s: offset commit refused after a rebalance (%s); harmless: "
                        "the next owner redelivers and the dedupe records skip what was "
                        "applied", self.group_id, first_line(exc))
        except KafkaError as exc:
            self._throttle.warn("commit", f"consumer {self.group_id}: offset commit failed "
                                f"({first_line(exc)}); redeliveries will be skipped")
        else:
            self._throttle.recovered("commit", f"consumer {self.group_id}: offsets commit again")

    def _apply_revocations(self) -> None:
        with self._lock:
            revoked, self._revoked = self._revoked, set()
        for tp in revoked:
            if self._holds.pop(tp, None) is not None and self._kc is not None:
                self._resume(tp)
            for key in [k for k in self._attempts if k[0] == tp]:
                del self._attempts[key]
            self._stuck.pop(tp, None)  # the next owner reports it if it is stuck there too
            self.metrics.forget(tp.topic, tp.partition)

    def _resume_due(self) -> None:
        now = time.monotonic()
        for tp, hold in list(self._holds.items()):
            if hold.until <= now:
                del self._holds[tp]
                self._resume(tp)

    def _resume(self, tp: Any) -> None:
        # kafka-python 3.0.12 parks the records it had parsed for a partition that gets
        # paused, and gives them back only when no other partition's (even exhausted)
        # records are next in line: on a quiet topic the resumed partition is then never
        # fetched again. After our seek they are stale anyway, so drop them.
        fetcher = getattr(self._kc, "_fetcher", None)
        for name in ("_paused_partition_records", "_paused_completed_fetches"):
            parked = getattr(fetcher, name, None)
            if isinstance(parked, dict):
                stale = parked.pop(tp, None)
                with contextlib.suppress(Exception):
                    if stale is not None and hasattr(stale, "drain"):
                        stale.drain()
        with contextlib.suppress(Exception):
            self._kc.resume(tp)

    # -- housekeeping -----------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_purge:
            self._next_purge = now + self.purge_interval
            self.purge_inbox()
        if self.metrics.on and now >= self._next_lag:
            self._next_lag = now + self.lag_interval
            self.update_lag()

    def purge_inbox(self, max_batches: int = 20) -> int:
        """Delete this group's dedupe records older than the retention, in bounded batches."""
        total = 0
        try:
            for _ in range(max_batches):
                with self._sessions() as session, session.begin():
                    n = self.store.purge_inbox_group(self._raw(session), self.group_id,
                                                     self.consumer.retention_seconds,
                                                     self.purge_batch)
                total += n
                if n < self.purge_batch:
                    break
        except (sa.exc.SQLAlchemyError, psycopg.Error) as exc:
            self._permanent(exc)
            self._throttle.warn("purge", f"consumer {self.group_id}: inbox purge failed "
                                f"({first_line(exc)})")
        if total:
            log.info("consumer %s: purged %d dedupe records older than %.0fs", self.group_id,
                     total, self.consumer.retention_seconds)
        return total

    def update_lag(self) -> dict[Any, int]:
        """Per assigned partition: end offset - position (what is left to consume)."""
        if self._kc is None:
            return {}
        lags: dict[Any, int] = {}
        try:
            assigned = list(self._kc.assignment() or ())
            if assigned:
                ends = self._kc.end_offsets(assigned, timeout_ms=2000)
                for tp in assigned:
                    pos = self._kc.position(tp, timeout_ms=1000)
                    if pos is not None and tp in ends:
                        lags[tp] = max(0, ends[tp] - pos)
        except Exception as exc:
            log.debug("consumer %s: lag not updated: %s", self.group_id, exc)
            return {}
        self.metrics.lag({(tp.topic, tp.partition): n for tp, n in lags.items()})
        return lags

    # -- resources --------------------------------------------------------------------

    def _raw(self, session: Session) -> psycopg.Connection[Any]:
        raw = session.connection().connection.driver_connection
        if not isinstance(raw, psycopg.Connection):
            raise ConfigError("the consumer needs PostgreSQL through psycopg 3 "
                              f"(postgresql+psycopg://), got {type(raw).__module__}")
        return raw

    def close(self) -> None:
        if self._kc is not None:
            try:
                self._kc.close(autocommit=False, timeout_ms=5000)
            except Exception as exc:
                log.warning("consumer %s: closing the Kafka consumer: %s", self.group_id, exc)
            self._kc = None
        self._close_dlq()
        self._holds.clear()
        if self._engine is not None:
            self._engine.dispose()


def _listener(runner: ConsumerRunner) -> Any:
    """A rebalance listener; it runs on kafka-python's IO thread, so it only takes notes."""
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
            revoked = list(revoked)
            if revoked:
                with runner._lock:
                    runner._revoked.update(revoked)
                log.info("consumer %s: partitions revoked: %s", runner.group_id,
                         _partitions(revoked))

        def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
            log.info("consumer %s: partitions assigned: %s", runner.group_id,
                     _partitions(list(assigned)))

    return Listener()


def dead_letter_headers(headers: Iterable[tuple[str, bytes | None]], *, topic: str,
                        partition: int, offset: int, reason: str,
                        error: str) -> list[tuple[str, bytes]]:
    """The original headers (minus earlier outbox_* ones) plus the error and the origin."""
    out = [(k, v if v is not None else b"") for k, v in headers if k not in DLQ_HEADERS]
    out += [
        ("outbox_error", error[:4000].encode(errors="replace")),
        ("outbox_original_topic", topic.encode()),
        ("outbox_original_partition", str(partition).encode()),
        ("outbox_original_offset", str(offset).encode()),
        ("outbox_reason", reason.encode()),
    ]
    return out


def truncated_dead_letter(key: bytes | None, value: bytes | None,
                          headers: list[tuple[str, bytes]]
                          ) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """A dead-letter copy small enough for any sane topic, from the whole one
    (`dead_letter_headers` applied): no value, the key and the original headers cut to
    a few KiB, the outbox_* headers (the original's coordinates, the error) kept, plus
    `outbox_truncated` (what was cut: value, key, headers) and `outbox_original_size`
    (key + value + original headers, in bytes)."""
    own = [(k, v) for k, v in headers if k in DLQ_HEADERS]
    original = [(k, v) for k, v in headers if k not in DLQ_HEADERS]
    size = len(key or b"") + len(value or b"") + sum(len(k.encode()) + len(v)
                                                    for k, v in original)
    cut = ["value"]
    if key is not None and len(key) > TRUNCATED_KEY_BYTES:
        key = key[:TRUNCATED_KEY_BYTES]
        cut.append("key")
    kept: list[tuple[str, bytes]] = []
    total = 0
    for k, v in original:
        n = len(k.encode()) + len(v)
        if n > TRUNCATED_HEADER_BYTES or total + n > TRUNCATED_HEADERS_TOTAL:
            continue
        kept.append((k, v))
        total += n
    if len(kept) < len(original):
        cut.append("headers")
    own = [(k, v) for k, v in own if k not in ("outbox_truncated", "outbox_original_size")]
    own += [("outbox_truncated", ",".join(cut).encode()),
            ("outbox_original_size", str(size).encode())]
    return key, b"", kept + own


def _disconnect(exc: BaseException) -> bool:
    """An error that means the database connection is gone (not a bad statement)."""
    lost = (psycopg.OperationalError, psycopg.InterfaceError)
    if isinstance(exc, sa.exc.DBAPIError):
        return bool(exc.connection_invalidated) or isinstance(exc.orig, lost)
    return isinstance(exc, lost)


def _connection_lost(exc: BaseException, conn: psycopg.Connection[Any]) -> bool:
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return bool(conn.broken or conn.closed)



def _partitions(tps: list[Any]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "none"


__all__ = [
    "ConsumerRunner",
    "ConsumerStats",
    "FunctionConsumer",
    "HandlerMisuse",
    "IdempotentConsumer",
    "consumer",
    "dead_letter_headers",
    "idempotent_consumer",
    "load_consumer",
    "truncated_dead_letter",
]
