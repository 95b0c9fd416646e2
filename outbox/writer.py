"""The write path: `Outbox.publish()` and `@Outbox.transactional`.

publish() validates and encodes the event at once (bad input fails at the call site),
but writes the row only when the top-level transaction commits, from SQLAlchemy's
`before_commit` hook, after flushing every pending domain statement of the transaction.
On PostgreSQL it first takes a transaction-scoped advisory lock per key (in sorted
order, so never a deadlock), held until the commit ends. Two transactions that publish
for one key therefore insert, and draw their `position`, in the order they commit: a
relay reading a shard by position sees each key's events in commit order
(docs/design.md, "Write-time ordering").

An event waits in `session.info` until then, tied to the transaction it was published
in. However that transaction ends without committing (rollback, close, invalidation),
its events are dropped with it; a rolled-back savepoint drops only its own.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar, cast

from sqlalchemy import Connection
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker
from sqlalchemy.orm import Session, SessionTransaction, scoped_session

from outbox import _unsafe, shardcount, tracing
from outbox.errors import ConfigError, InvalidSession, PayloadNotSerializable, PayloadTooLarge
from outbox.event import (
    DEFAULT_SOURCE,
    Event,
    Headers,
    RecordSizer,
    check_headers,
    key_size,
    text_size,
    type_size,
    validate_topic,
)
from outbox.keys import key_hash, key_lock
from outbox.schema import DEFAULT_PREFIX, Tables, make_tables
from outbox.serde import JsonSerializer, Serializer, encode_headers, json_headers
from outbox.transactional import async_wrapper, sync_wrapper, takes_self
from outbox.write_sql import write_one_statements, write_statements

P = ParamSpec("P")
R = TypeVar("R")

# Kafka's default message.max.bytes is 1048588 (1 MiB + 12): this stays 12 bytes under.
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
DEFAULT_SHARDS = shardcount.DEFAULT_SHARDS
NotifyMode = Literal["auto", "always", "never"]

# session.info key of the events waiting for the commit: {Outbox: [pending, ...]}
_PENDING = "outbox.pending"
# session.info key set while the commit hook writes the events (see _before_commit)
_COMMITTING = "outbox.committing"
_hooks_installed = False

@dataclass
class _Pending:
    event: Event
    hash: int  # the shard is hash % the database's shard count, taken at commit
    tx: SessionTransaction | None


class Outbox:
    """Writes events into the outbox table inside the caller's database transaction."""

    def __init__(
        self,
        *,
        table_prefix: str = DEFAULT_PREFIX,
        serializer: Serializer | None = None,
        source: str = DEFAULT_SOURCE,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        num_shards: int | None = None,
        notify: NotifyMode = "auto",
    ) -> None:
        if num_shards is not None and not 1 <= num_shards <= 1024:
            raise ConfigError(f"num_shards must be between 1 and 1024, got {num_shards}")
        if max_event_bytes <= 0:
            raise ConfigError(f"max_event_bytes must be positive, got {max_event_bytes}")
        if notify not in ("auto", "always", "never"):
            raise ConfigError(f"notify must be 'auto', 'always' or 'never', got {notify!r}")
        self.tables: Tables = make_tables(table_prefix)
        self.serializer: Serializer = serializer or JsonSerializer()
        self.source = source
        self.max_event_bytes = max_event_bytes
        # None: the database's count (outbox.shardcount); given, it must agree with it.
        self.num_shards = num_shards
        self._checked: weakref.WeakSet[Any] = weakref.WeakSet()  # engines that agree
        self._sqlite_counts: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.notify = notify
        for what, text in (("source", source),
                           ("serializer.content_type", self.serializer.content_type)):
            if not isinstance(text, str) or not text:
                raise ConfigError(f"{what} must be a non-empty str, got {text!r}")
            text_size(text, what, ConfigError)  # it goes into every row and record
        self._sizer = RecordSizer(source=source, content_type=self.serializer.content_type)
        self._insert = self.tables.events.insert()
        self._pg_write = write_statements(self.tables)
        self._pg_write_one = write_one_statements(self.tables)

    # -- publishing ------------------------------------------------------------------

    def publish(
        self,
        session: Session | AsyncSession | scoped_session[Any] | async_scoped_session[Any],
        *,
        topic: str,
        key: str,
        type: str,
        payload: Any,
        headers: Headers | None = None,
    ) -> Event:
        """Add an event to the session's transaction; it exists iff that transaction commits.

        `session` is a `Session` or `AsyncSession`, or a `scoped_session` or
        `async_scoped_session` (its current session is used); anything else, such as a
        `Connection`, raises InvalidSession. A session without a transaction begins one,
        as `Session.add()` does.

        Raises a PublishError subclass naming the problem for bad input; then nothing
        was added and the session is untouched.

        Size: the event is measured as Kafka will measure it, as the record batch the
        relay sends it in when alone (61-byte batch header, the record's varint framing,
        key, payload, the CloudEvents headers and the user's), counting `ce_time` at
        its longest, so the count is exact or up to 7 bytes over. That is compared with
        `max_event_bytes`. Kafka's default `message.max.bytes` is 1048588, so the default
        limit (1 MiB) leaves a margin of 12 bytes; with your own broker or topic limit,
        set `max_event_bytes` to it at most.
        """
        sync = _session_of(session)
        validate_topic(topic)
        key_len = key_size(key)
        type_len = type_size(type)
        user_headers, headers_len = check_headers(headers)
        traced = tracing.inject(user_headers)
        if traced is not user_headers:  # the trace context counts towards the size
            user_headers, headers_len = check_headers(traced)
        data = self.serializer.dumps(payload)
        if not isinstance(data, bytes):
            if not isinstance(data, bytearray | memoryview):
                raise PayloadNotSerializable(
                    f"{self.serializer.__class__.__name__}.dumps() returned "
                    f"{data.__class__.__name__}, not bytes"
                )
            data = bytes(data)
        size = self._sizer.size(key=key_len, value=len(data), type=type_len,
                                headers=headers_len, header_count=len(user_headers))
        if size > self.max_event_bytes:
            raise PayloadTooLarge(
                f"event of type {type!r} for topic {topic!r} is {size} bytes as Kafka "
                "counts it (payload, key, headers and record framing), over the limit "
                f"of {self.max_event_bytes} bytes (Outbox(max_event_bytes=...))"
            )
        event = Event(
            topic=topic,
            key=key,
            type=type,
            payload=payload,
            data=data,
            content_type=self.serializer.content_type,
            source=self.source,
            headers=user_headers,
        )
        pending = _Pending(event, key_hash(key), _current_tx(sync))
        if _unsafe.disabled("ordering"):
            # Fault injection only: insert at once, without the key lock.
            conn = sync.connection()
            conn.execute(self._insert, [self._row(pending, self._shard_count(conn))])
            return event
        _install_hooks()
        sync.info.setdefault(_PENDING, {}).setdefault(self, []).append(pending)
        return event

    def _write(self, session: Session, queue: list[_Pending]) -> None:
        """Insert the transaction's events just before it commits (see the module doc)."""
        conn = session.connection()
        if conn.dialect.name != "postgresql":
            n = self._sqlite_counts.get(conn.engine) or self._shard_count(conn)
            self._sqlite_counts[conn.engine] = n  # one process, no relay to change it
            conn.execute(self._insert, [self._row(p, n) for p in queue])
            return
        if conn.engine not in self._checked:
            self._shard_count(conn)  # once per engine: the count is set, and agrees
        ch = self.tables.channel
        if len(queue) == 1:  # the common case: scalar parameters adapt faster than arrays
            p, e = queue[0], queue[0].event
            conn.exec_driver_sql(self._pg_write_one[self.notify], {
                "ns": self.tables.lock_namespace, "lock": key_lock(e.key), "id": e.id,
                "topic": e.topic, "key": e.key, "type": e.type, "payload": e.data,
                "ct": e.content_type, "source": e.source, "headers": json_headers(e.headers),
                "time": e.occurred_at, "hash": p.hash, "ch": ch,
            })
            return
        events = [p.event for p in queue]
        params: dict[str, Any] = {
            "ns": self.tables.lock_namespace,
            "locks": sorted({key_lock(e.key) for e in events}),
            "ids": [e.id for e in events],
            "topics": [e.topic for e in events],
            "keys": [e.key for e in events],
            "types": [e.type for e in events],
            "payloads": [e.data for e in events],
            "cts": [e.content_type for e in events],
            "sources": [e.source for e in events],
            "headers": [json_headers(e.headers) for e in events],
            "times": [e.occurred_at for e in events],
            "hashes": [p.hash for p in queue],
            "ch": ch,
        }
        conn.exec_driver_sql(self._pg_write[self.notify], params)

    def _shard_count(self, conn: Connection) -> int:
        """The database's shard count, checked once per engine on PostgreSQL: set by
        `outbox db upgrade` (the INSERT divides by it) and equal to an explicit
        `num_shards`. SQLite has no relays to disagree with: tables made with
        `create_all` (no count) get `num_shards`, or 16."""
        n = shardcount.read(conn, self.tables)
        if n == 0 and conn.dialect.name != "postgresql":
            return self.num_shards or shardcount.DEFAULT_SHARDS
        shardcount.mismatch(self.num_shards, n, "Outbox(num_shards=...)")
        self._checked.add(conn.engine)
        return n

    def _row(self, p: _Pending, num_shards: int) -> dict[str, Any]:
        e = p.event
        return {
            "event_id": e.id,
            "topic": e.topic,
            "key": e.key,
            "type": e.type,
            "payload": e.data,
            "content_type": e.content_type,
            "source": e.source,
            "headers": encode_headers(e.headers),
            "occurred_at": e.occurred_at,
            "shard": p.hash % num_shards,
        }

    # -- the decorator ----------------------------------------------------------------

    def transactional(self, session_factory: Any) -> Callable[[Callable[..., Any]], Any]:
        """Run the decorated function in one transaction, passing the session first.

        Commits when it returns, rolls back when it raises. A decorated function called
        from inside another one with the same factory joins the outer transaction in a
        savepoint of its own: when it raises, its rows and events are rolled back even
        if the caller catches the exception. On a method (first parameter `self` or
        `cls`) the session is passed after it. Works with `sessionmaker` on plain
        functions and with `async_sessionmaker` on `async def` functions.
        """
        fid = id(session_factory)

        def decorate(fn: Callable[..., Any]) -> Any:
            if isinstance(fn, classmethod | staticmethod):
                raise ConfigError(
                    f"put @transactional below @{type(fn).__name__}, not above it"
                )
            method = takes_self(fn)
            if inspect.iscoroutinefunction(fn):
                if not isinstance(session_factory, async_sessionmaker):
                    raise ConfigError(
                        f"{fn.__qualname__} is async: decorate it with an async_sessionmaker"
                    )
                return async_wrapper(fn, session_factory, fid, method)
            if isinstance(session_factory, async_sessionmaker):
                raise ConfigError(
                    f"{fn.__qualname__} is not async: use a sessionmaker, not an "
                    "async_sessionmaker"
                )
            return sync_wrapper(fn, session_factory, fid, method)

        return decorate


def _install_hooks() -> None:
    """Listen once, on the Session class: per-instance listeners cost more than a commit."""
    global _hooks_installed
    if not _hooks_installed:
        sa_event.listen(Session, "before_commit", _before_commit)
        sa_event.listen(Session, "after_soft_rollback", _after_soft_rollback)
        sa_event.listen(Session, "after_transaction_end", _after_transaction_end)
        _hooks_installed = True


def _before_commit(session: Session) -> None:
    """Write the pending events when the top-level transaction commits.

    A savepoint's release fires this hook too: its events wait for the top-level commit
    (one write per transaction, key locks held no longer than needed). The flush comes
    first, so that events published by flush hooks are written too and the key locks
    are taken after the domain statements.
    """
    if session.in_nested_transaction():
        return
    # Flush until clean, as SQLAlchemy's commit would right after this hook: an event a
    # flush hook publishes is then still written, and the key locks come last.
    for _ in range(100):
        session.flush()
        if not (session.new or session.dirty or session.deleted):
            break
    # From here on the events are being written: publish() refuses (never a silent loss).
    session.info[_COMMITTING] = True
    boxes: dict[Outbox, list[_Pending]] | None = session.info.get(_PENDING)
    if boxes:
        # Outboxes in a fixed order (their lock namespaces), so two transactions that
        # publish to two outboxes take the key locks in one order: no deadlock.
        for box in sorted(boxes, key=lambda b: b.tables.lock_namespace):
            if boxes[box]:
                box._write(session, boxes[box])
        # Only once every write succeeded: a commit retried after an error writes again.
        session.info.pop(_PENDING, None)


def _after_soft_rollback(session: Session, previous: SessionTransaction) -> None:
    """A rollback drops the events of what it rolled back: a savepoint's own, or all."""
    boxes: dict[Outbox, list[_Pending]] | None = session.info.get(_PENDING)
    if not boxes:
        return
    # What SQLAlchemy rolled back: the nearest savepoint or the top-level transaction
    # (`previous` may be a flush's subtransaction inside it).
    boundary = previous
    while boundary.parent is not None and not boundary.nested:
        boundary = boundary.parent
    _drop_within(session, boxes, boundary)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    """The top-level transaction ended (committed, rolled back, closed, invalidated):
    whatever it still holds will never be written. A savepoint's end is not decisive:
    released, its events join the enclosing transaction; rolled back, see above."""
    if transaction.parent is None:
        session.info.pop(_COMMITTING, None)
        boxes: dict[Outbox, list[_Pending]] | None = session.info.get(_PENDING)
        if boxes:
            _drop_within(session, boxes, transaction)


def _drop_within(session: Session, boxes: dict[Outbox, list[_Pending]],
                 ended: SessionTransaction) -> None:
    for box in list(boxes):
        kept = [p for p in boxes[box] if not _within(p.tx, ended)]
        if kept:
            boxes[box] = kept
        else:
            del boxes[box]
    if not boxes:
        session.info.pop(_PENDING, None)


def _session_of(session: object) -> Session:
    """The ORM Session behind what publish() was given; refuses what has no commit hook."""
    if isinstance(session, Session):
        return session
    if isinstance(session, AsyncSession):
        return session.sync_session
    if isinstance(session, scoped_session):
        return cast(Session, session())  # the current session of its scope
    if isinstance(session, async_scoped_session):
        return cast(AsyncSession, session()).sync_session
    kind = type(session).__name__
    if "Connection" in kind:
        fix = ("a Connection has no commit hook to write the event from, so it would be "
               "lost: open `Session(bind=conn)` on it, publish on that session and call "
               "its commit() inside the `with` block")
    else:
        fix = ("pass the session of the transaction the event belongs to "
               "(sqlalchemy.orm.Session, AsyncSession, or a scoped one)")
    raise InvalidSession(f"publish() needs a Session or an AsyncSession, got {kind}: {fix}")


def _current_tx(session: Session) -> SessionTransaction:
    """The innermost transaction, begun as `Session.add()` begins it if there is none:
    an event always belongs to a transaction whose end the hooks see."""
    if session.info.get(_COMMITTING):
        raise InvalidSession(
            "publish() during the commit, after the outbox wrote this transaction's "
            "events (from a before_commit listener or a flush the commit triggered): "
            "publish before commit(), or from a before_flush hook")
    tx = session.get_nested_transaction() or session.get_transaction()
    if tx is None:
        try:
            tx = session._autobegin_t()
        except sa_exc.InvalidRequestError as exc:  # autobegin=False and no begin()
            raise InvalidSession(
                f"the session has no transaction to publish in ({exc}): call "
                "session.begin() first"
            ) from None
    if not tx.is_active:
        raise InvalidSession(
            "the session's transaction is no longer active (an error rolled it back, or "
            "it is committing): call session.rollback() and publish in a new one"
        )
    return tx


def _within(tx: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while tx is not None:
        if tx is ancestor:
            return True
        tx = tx.parent
    return False
