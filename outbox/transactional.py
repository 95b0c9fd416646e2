"""`@outbox.transactional(factory)`: run a function in a transaction of its own, or, called
from inside another decorated call of the same factory, in a savepoint of that one."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from outbox.errors import ConfigError

R = TypeVar("R")

# The session each session factory has open in this context, so nested calls join it.
_active_sessions: ContextVar[Mapping[int, Any]] = ContextVar(
    "outbox_active_sessions", default=MappingProxyType({}))


def takes_self(fn: Callable[..., Any]) -> bool:
    """Whether fn is a method (its first parameter is `self` or `cls`): the session then
    goes second. Refuses a function with no positional parameter to take the session."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False
    positional = [p for p in params if p.kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    method = bool(positional) and positional[0].name in ("self", "cls")
    if len(positional) < 1 + method and not varargs:
        where = f"after {positional[0].name!r}" if method else "first"
        raise ConfigError(
            f"{fn.__qualname__} takes no parameter for the session, which "
            f"@transactional passes {where}"
        )
    return method


def _arguments(session: Any, args: tuple[Any, ...], method: bool) -> tuple[Any, ...]:
    return (*args[:1], session, *args[1:]) if method else (session, *args)


def sync_wrapper(
    fn: Callable[..., R], factory: sessionmaker[Session], fid: int, method: bool
) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        active = _active_sessions.get()
        joined = active.get(fid)
        if joined is not None:
            _begin_for_savepoint(joined)
            with joined.begin_nested():  # rolled back if fn raises, even when caught
                return fn(*_arguments(joined, args, method), **kwargs)
        with factory() as session, session.begin():
            token = _active_sessions.set({**active, fid: session})
            try:
                return fn(*_arguments(session, args, method), **kwargs)
            finally:
                _active_sessions.reset(token)

    return wrapper


def async_wrapper(
    fn: Callable[..., Awaitable[R]], factory: async_sessionmaker[AsyncSession], fid: int,
    method: bool,
) -> Any:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> R:
        active = _active_sessions.get()
        joined = active.get(fid)
        if joined is not None:
            if is_sqlite(joined.sync_session):
                await joined.run_sync(_begin_for_savepoint)
            async with joined.begin_nested():  # rolled back if fn raises, even when caught
                return await fn(*_arguments(joined, args, method), **kwargs)
        async with factory() as session, session.begin():
            token = _active_sessions.set({**active, fid: session})
            try:
                return await fn(*_arguments(session, args, method), **kwargs)
            finally:
                _active_sessions.reset(token)

    return wrapper


def is_sqlite(session: Session) -> bool:
    bind = session.bind
    return bind is not None and bind.dialect.name == "sqlite"


def _begin_for_savepoint(session: Session) -> None:
    """pysqlite and aiosqlite begin SQLite's transaction lazily, at the first write: a
    SAVEPOINT before that would begin it instead, and its RELEASE would commit the
    outer call's work. So begin it first (SQLite only; a no-op elsewhere)."""
    if not is_sqlite(session):
        return
    conn = session.connection()
    if not getattr(conn.connection.driver_connection, "in_transaction", True):
        conn.exec_driver_sql("BEGIN")
