"""The write path: `Outbox.publish()` and `@Outbox.transactional`.

publish() validates and encodes the event at once (bad input fails at the call site),
but writes the row only when the transaction commits, from SQLAlchemy's `before_commit`
hook, after every domain statement of the transaction. On PostgreSQL it first takes a
transaction-scoped advisory lock per key (in sorted order, so never a deadlock), held
until the commit ends. Two transactions that publish for one key therefore insert,
and draw their `position`, in the order they commit: a relay reading a shard by
position sees each key's events in commit order (DESIGN.md, "Commit order is not id
order").
"""

from __future__ import annotations

import functools
import inspect
import json
import weakref
import zlib
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, ParamSpec, TypeVar, cast

from sqlalchemy import Connection
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from outbox import _unsafe, shardcount
from outbox.errors import ConfigError, PayloadTooLarge
from outbox.event import (
    DEFAULT_SOURCE,
    Event,
    Headers,
    validate_headers,
    validate_key,
    validate_topic,
    validate_type,
)
from outbox.schema import DEFAULT_PREFIX, Tables, make_tables
from outbox.serde import JsonSerializer, Serializer

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024  # Kafka's default message.max.bytes is ~1 MiB
DEFAULT_SHARDS = shardcount.DEFAULT_SHARDS
NotifyMode = Literal["auto", "always", "never"]

# session.info key of the events waiting for the commit: {Outbox: [pending, ...]}
_PENDING = "outbox.pending"
_hooks_installed = False

# The session each session factory has open in this context, so nested calls join it.
_active_sessions: ContextVar[Mapping[int, Any]] = ContextVar(
    "outbox_active_sessions", default=MappingProxyType({}))


def key_hash(key: str) -> int:
    """The key's hash (unsigned crc32): stable across processes, hosts and versions."""
    return zlib.crc32(key.encode())


def shard_of(key: str, num_shards: int) -> int:
    """The shard of a key; on PostgreSQL the INSERT computes the same from the table."""
    return key_hash(key) % num_shards


def key_lock(key: str) -> int:
    """The advisory-lock id of a key (a signed int32, as pg_advisory_xact_lock takes)."""
    h = zlib.crc32(key.encode())
    return h - (1 << 32) if h >= 1 << 31 else h


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
        self.notify = notify
        self._insert = self.tables.events.insert()
        self._pg_write = _pg_write_statements(self.tables)
        self._pg_write_one = _pg_write_one_statements(self.tables)

    # -- publishing ------------------------------------------------------------------

    def publish(
        self,
        session: Session | AsyncSession,
        *,
        topic: str,
        key: str,
        type: str,
        payload: Any,
        headers: Headers | None = None,
    ) -> Event:
        """Add an event to the session's transaction; it exists iff that transaction commits.

        Raises a PublishError subclass naming the problem for bad input; then nothing
        was added and the session is untouched.
        """
        validate_topic(topic)
        validate_key(key)
        validate_type(type)
        user_headers = validate_headers(headers)
        data = self.serializer.dumps(payload)
        size = len(data) + len(key.encode()) + sum(
            len(n) + len(v if isinstance(v, bytes) else v.encode())
            for n, v in user_headers.items()
        )
        if size > self.max_event_bytes:
            raise PayloadTooLarge(
                f"event of type {type!r} for topic {topic!r} is {size} bytes, over the "
                f"limit of {self.max_event_bytes} bytes (Outbox(max_event_bytes=...))"
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
        sync = session.sync_session if isinstance(session, AsyncSession) else session
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
            n = self._shard_count(conn)
            conn.execute(self._insert, [self._row(p, n) for p in queue])
            return
        if self.num_shards is not None and conn.engine not in self._checked:
            self._shard_count(conn)  # once per engine: an explicit count must agree
        ch = self.tables.channel
        if len(queue) == 1:  # the common case: scalar parameters adapt faster than arrays
            p, e = queue[0], queue[0].event
            conn.exec_driver_sql(self._pg_write_one[self.notify], {
                "ns": self.tables.lock_namespace, "lock": key_lock(e.key), "id": e.id,
                "topic": e.topic, "key": e.key, "type": e.type, "payload": e.data,
                "ct": e.content_type, "source": e.source, "headers": _json_headers(e.headers),
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
            "headers": [_json_headers(e.headers) for e in events],
            "times": [e.occurred_at for e in events],
            "hashes": [p.hash for p in queue],
            "ch": ch,
        }
        conn.exec_driver_sql(self._pg_write[self.notify], params)

    def _shard_count(self, conn: Connection) -> int:
        """The database's shard count (checked against an explicit `num_shards`)."""
        n = shardcount.read(conn, self.tables)
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
        from inside another one with the same factory joins the outer transaction.
        Works with `sessionmaker` on plain functions and with `async_sessionmaker` on
        `async def` functions.
        """
        fid = id(session_factory)

        def decorate(fn: Callable[..., Any]) -> Any:
            if inspect.iscoroutinefunction(fn):
                if not isinstance(session_factory, async_sessionmaker):
                    raise ConfigError(
                        f"{fn.__qualname__} is async: decorate it with an async_sessionmaker"
                    )
                return _async_wrapper(fn, session_factory, fid)
            if isinstance(session_factory, async_sessionmaker):
                raise ConfigError(
                    f"{fn.__qualname__} is not async: use a sessionmaker, not an "
                    "async_sessionmaker"
                )
            return _sync_wrapper(fn, session_factory, fid)

        return decorate


def _pg_write_statements(tables: Tables) -> dict[str, str]:
    """One round trip per commit: lock the keys (sorted: no deadlock), insert every event
    in publish order, and NOTIFY only if a relay of one of these shards sleeps."""
    sh = tables.shards.name
    write = (
        f"WITH n AS MATERIALIZED (SELECT count(*) AS n FROM {sh}), "
        "locks AS MATERIALIZED (SELECT count(pg_advisory_xact_lock(%(ns)s, k)) "
        "FROM unnest(%(locks)s::int4[]) AS k), "
        f"ins AS (INSERT INTO {tables.events.name} (event_id, topic, key, type, payload, "
        "content_type, source, headers, occurred_at, shard) "
        "SELECT r.id, r.topic, r.key, r.type, r.payload, r.ct, r.source, r.headers, r.time, "
        "mod(r.h, n.n)::int2 FROM locks, n, unnest(%(ids)s::uuid[], %(topics)s::text[], "
        "%(keys)s::text[], %(types)s::text[], %(payloads)s::bytea[], %(cts)s::text[], "
        "%(sources)s::text[], %(headers)s::json[], %(times)s::timestamptz[], "
        "%(hashes)s::int8[]) AS r(id, topic, key, type, payload, ct, source, headers, time, h)) "
    )
    # (A data-modifying WITH runs to completion even when nothing reads it, and no
    # RETURNING means writers need no SELECT on the events table.)
    return {
        "never": write + "SELECT 1",
        "always": write + "SELECT pg_notify(%(ch)s, '')",
        "auto": write + f"SELECT pg_notify(%(ch)s, '') FROM {sh}, n WHERE relay_waiting "
        "AND shard IN (SELECT mod(h, n.n) FROM unnest(%(hashes)s::int8[]) AS h) LIMIT 1",
    }


def _pg_write_one_statements(tables: Tables) -> dict[str, str]:
    """The same for a transaction that published one event."""
    sh = tables.shards.name
    write = (
        f"WITH n AS MATERIALIZED (SELECT count(*) AS n FROM {sh}), "
        "locks AS MATERIALIZED (SELECT pg_advisory_xact_lock(%(ns)s, %(lock)s)), "
        f"ins AS (INSERT INTO {tables.events.name} (event_id, topic, key, type, payload, "
        "content_type, source, headers, occurred_at, shard) "
        "SELECT %(id)s, %(topic)s, %(key)s, %(type)s, %(payload)s, %(ct)s, %(source)s, "
        "%(headers)s::json, %(time)s, mod(%(hash)s::int8, n.n)::int2 FROM locks, n) "
    )
    return {
        "never": write + "SELECT 1",
        "always": write + "SELECT pg_notify(%(ch)s, '')",
        "auto": write + f"SELECT pg_notify(%(ch)s, '') FROM {sh}, n "
        "WHERE relay_waiting AND shard = mod(%(hash)s::int8, n.n) LIMIT 1",
    }


def _install_hooks() -> None:
    """Listen once, on the Session class: per-instance listeners cost more than a commit."""
    global _hooks_installed
    if not _hooks_installed:
        sa_event.listen(Session, "before_commit", _before_commit)
        sa_event.listen(Session, "after_soft_rollback", _after_soft_rollback)
        _hooks_installed = True


def _before_commit(session: Session) -> None:
    boxes: dict[Outbox, list[_Pending]] | None = session.info.pop(_PENDING, None)
    if boxes:
        for box, queue in boxes.items():
            if queue:
                box._write(session, queue)


def _after_soft_rollback(session: Session, previous: SessionTransaction) -> None:
    boxes: dict[Outbox, list[_Pending]] | None = session.info.get(_PENDING)
    if not boxes:
        return
    if not previous.nested:
        session.info.pop(_PENDING, None)
        return
    # A rolled-back savepoint drops the events published inside it, and only those.
    for queue in boxes.values():
        queue[:] = [p for p in queue if not _within(p.tx, previous)]


def _json_headers(headers: Mapping[str, str | bytes]) -> str | None:
    encoded = encode_headers(headers)
    return None if encoded is None else json.dumps(encoded)


def _sync_wrapper(fn: Callable[..., R], factory: sessionmaker[Session], fid: int) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        active = _active_sessions.get()
        joined = active.get(fid)
        if joined is not None:
            return fn(joined, *args, **kwargs)
        with factory() as session, session.begin():
            token = _active_sessions.set({**active, fid: session})
            try:
                return fn(session, *args, **kwargs)
            finally:
                _active_sessions.reset(token)

    return wrapper


def _async_wrapper(
    fn: Callable[..., Awaitable[R]], factory: async_sessionmaker[AsyncSession], fid: int
) -> Any:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> R:
        active = _active_sessions.get()
        joined = active.get(fid)
        if joined is not None:
            return await fn(joined, *args, **kwargs)
        async with factory() as session, session.begin():
            token = _active_sessions.set({**active, fid: session})
            try:
                return await fn(session, *args, **kwargs)
            finally:
                _active_sessions.reset(token)

    return wrapper


def _current_tx(session: Session) -> SessionTransaction | None:
    return session.get_nested_transaction() or session.get_transaction()


def _within(tx: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while tx is not None:
        if tx is ancestor:
            return True
        tx = tx.parent
    return False


def encode_headers(headers: Mapping[str, str | bytes]) -> dict[str, Any] | None:
    """Headers as JSON: str values as they are, bytes values as {"b": hex}."""
    if not headers:
        return None
    return {n: ({"b": v.hex()} if isinstance(v, bytes) else v) for n, v in headers.items()}


def decode_headers(stored: Mapping[str, Any] | None) -> dict[str, str | bytes]:
    if not stored:
        return {}
    return {n: (bytes.fromhex(v["b"]) if isinstance(v, dict) else cast(str, v))
            for n, v in stored.items()}
