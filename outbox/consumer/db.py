"""The consumer's database side: engine, sessions, the inbox's SQL, and the bridge that
runs a batch for an async handler.

An `AsyncIdempotentConsumer` gets an AsyncSession. The runner's own code stays
synchronous: a batch is applied inside SQLAlchemy's greenlet bridge (`greenlet_spawn`,
as `AsyncSession.run_sync` does) on an event loop the runner keeps, on the session
behind the AsyncSession; the handler's coroutine is awaited from there (`await_only`).
So the same applier serves both, statement for statement.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from outbox.consumer.calls import ASYNC_SESSION
from outbox.consumer.config import ConsumerConfig
from outbox.consumer.inbox import inbox_for
from outbox.dburl import mask, sqlalchemy_url
from outbox.errors import ConfigError
from outbox.schema import make_tables

T = TypeVar("T")


class Database:
    """Sessions for the batches, the inbox's statements, and `run(fn)` to call code that
    uses them (inside the greenlet bridge for an async consumer)."""

    def __init__(self, config: ConsumerConfig, *, group_id: str, is_async: bool,
                 engine: sa.Engine | AsyncEngine | None = None,
                 session_factory: Callable[[], Session] | None = None) -> None:
        self.config = config
        self.group_id = group_id
        self.is_async = is_async
        self.tables = make_tables(config.table_prefix)
        self._own_engine = False
        self._loop: asyncio.Runner | None = None
        if session_factory is not None and is_async:
            raise ConfigError("an AsyncIdempotentConsumer needs db_url or an AsyncEngine, "
                              "not a (synchronous) session_factory")
        if session_factory is None and engine is None:
            if config.db_url is None:
                raise ConfigError("ConsumerRunner needs db_url, engine or session_factory")
            engine = self._make_engine(config.db_url)
            self._own_engine = True
        self.engine = engine
        if isinstance(engine, AsyncEngine) != is_async and engine is not None:
            raise ConfigError("an AsyncIdempotentConsumer needs an AsyncEngine, an "
                              "IdempotentConsumer a (synchronous) Engine")
        bind = engine if engine is not None else getattr(session_factory, "kw", {}).get("bind")
        dialect = bind.dialect if bind is not None else None
        if dialect is not None and dialect.name == "postgresql" and \
                dialect.driver not in ("psycopg", "psycopg_async"):
            raise ConfigError("the consumer needs PostgreSQL through psycopg 3 "
                              f"(postgresql+psycopg://), got the {dialect.driver} driver")
        self.inbox = inbox_for(dialect.name if dialect is not None else "postgresql",
                               self.tables)
        self._factory: Callable[[], Session] | None = session_factory
        if session_factory is None and not is_async:
            assert isinstance(engine, sa.Engine)
            self._factory = sessionmaker(engine)
        self.where = mask(config.db_url) if config.db_url else repr(engine or session_factory)

    def _make_engine(self, db_url: str) -> sa.Engine | AsyncEngine:
        url = sqlalchemy_url(db_url)
        if url.startswith("sqlite"):  # for tests: one process, no timeouts to set
            if self.is_async:
                return create_async_engine(url.replace("sqlite:", "sqlite+aiosqlite:", 1))
            return sa.create_engine(url)
        options = []
        if self.config.idle_tx_timeout:
            # A stalled consumer (SIGSTOP, hung call) must not keep its batch's dedupe
            # records locked forever: the next owner's claim waits on them.
            options.append(f"-c idle_in_transaction_session_timeout="
                           f"{int(self.config.idle_tx_timeout * 1000)}")
        if self.config.handler_timeout:
            # Database work of a handler is bounded by handler_timeout (watchdog.py)
            options.append(f"-c statement_timeout={int(self.config.handler_timeout * 1000)}")
        connect_args: dict[str, Any] = {
            "connect_timeout": 5, "application_name": f"outbox-consumer {self.group_id}"[:63]}
        if options:
            connect_args["options"] = " ".join(options)
        if self.is_async:
            return create_async_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2,
                                       connect_args=connect_args)
        return sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2,
                                connect_args=connect_args)

    @contextlib.contextmanager
    def sessions(self) -> Iterator[Session]:
        """A session for one transaction (for an async consumer: the one behind an
        AsyncSession, which its handler gets; call this only inside `run`)."""
        if self._factory is not None:
            with self._factory() as session:
                yield session
            return
        assert isinstance(self.engine, AsyncEngine)
        asession = AsyncSession(self.engine)
        session = asession.sync_session
        session.info[ASYNC_SESSION] = asession
        try:
            yield session
        finally:
            session.close()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`; for an async consumer inside the greenlet bridge, on the runner's
        own event loop (made on first use, in the runner's thread)."""
        if not self.is_async:
            return fn(*args)
        from sqlalchemy.util import greenlet_spawn

        if self._loop is None:
            self._loop = asyncio.Runner()
        result: T = self._loop.run(greenlet_spawn(fn, *args))
        return result

    def record_out_of_band(self, ids: list[Any], error: str, count: int) -> None:
        """Record an attempt (or, with count 0, a suspect) from another thread, on a
        connection of its own: the watchdog's, while the batch's is stuck in a handler."""
        engine = self.engine
        if isinstance(engine, AsyncEngine):
            url = engine.url
            driver = "postgresql+psycopg" if url.get_backend_name() == "postgresql" else \
                url.get_backend_name()
            engine = sa.create_engine(url.set(drivername=driver), poolclass=sa.pool.NullPool)
        if engine is not None:
            with engine.begin() as conn:
                self._record(conn, ids, error, count)
            return
        assert self._factory is not None
        with self._factory() as session, session.begin():
            self._record(session.connection(), ids, error, count)

    def _record(self, conn: sa.Connection, ids: list[Any], error: str, count: int) -> None:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
        for event_id in ids:
            self.inbox.record_attempt(conn, self.group_id, event_id, error, count)

    def close(self) -> None:
        engine = self.engine
        if self._own_engine and engine is not None:
            if isinstance(engine, AsyncEngine):
                if self._loop is not None:
                    with contextlib.suppress(Exception):
                        self._loop.run(engine.dispose())
            else:
                engine.dispose()
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.close()
            self._loop = None
