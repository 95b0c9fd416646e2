"""Calling the user's handler: guarded, visible to the watchdog, bounded in time.

The guard: while a handler runs, committing a transaction the runner owns raises
`HandlerMisuse` at once (before anything reaches the database), and rolling it back or
closing the session is noticed; the runner then refuses the batch. The handler's own
savepoints (`with session.begin_nested():`) commit as usual.

The call in progress (`HandlerCalls.running`) is what the watchdog reports and what
`handler_timeout` bounds (outbox.consumer.watchdog). An async handler is awaited
through SQLAlchemy's greenlet bridge, under `asyncio.wait_for(handler_timeout)`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, SessionTransaction

from outbox.consumer.source import Record
from outbox.errors import OutboxError
from outbox.event import Event


class HandlerMisuse(OutboxError, RuntimeError):
    """`handle` committed, rolled back or closed the session it was given (the runner owns
    its transaction). A programming error, not a bad event: the runner stops with it
    instead of dead-lettering every event the handler touches, and nothing of the batch
    is committed (in external mode, nothing of that event)."""


class HandlerTimeout(TimeoutError):
    """An async handler ran longer than `handler_timeout` and was cancelled: one failed
    attempt of its event."""


#: session.info keys: the transactions the runner owns while a handler runs, what the
#: handler did to them, and the AsyncSession an async handler is given.
_OWNED = "outbox.consumer.owned"
_MISUSE = "outbox.consumer.misuse"
_GUARDED = "outbox.consumer.guarded"
ASYNC_SESSION = "outbox.consumer.async_session"


def _refuse_commit(session: Session) -> None:
    owned = session.info.get(_OWNED)
    if owned and (session.get_nested_transaction() or session.get_transaction()) in owned:
        session.info[_MISUSE] = "called session.commit()"
        raise HandlerMisuse("session.commit() inside a consumer's handle(): the runner "
                            "commits the batch's transaction itself, after the batch")


def _note_end(session: Session, transaction: SessionTransaction) -> None:
    owned = session.info.get(_OWNED)
    if owned and transaction in owned:
        session.info.setdefault(_MISUSE, "rolled back or closed the session")


def _guard(session: Session) -> None:
    if _GUARDED not in session.info:  # cheaper than asking SQLAlchemy's event registry
        if not sa.event.contains(session, "before_commit", _refuse_commit):
            sa.event.listen(session, "before_commit", _refuse_commit)
            sa.event.listen(session, "after_transaction_end", _note_end)
        session.info[_GUARDED] = True


@dataclass
class Running:
    """The handler call in progress (for the watchdog and for truthful messages)."""

    events: Sequence[Event]
    record: Record
    started: float
    is_async: bool = False

    @property
    def event_id(self) -> uuid.UUID:
        return self.events[0].id

    def __str__(self) -> str:
        where = f"{self.record.topic}[{self.record.partition}] offset {self.record.offset}"
        if len(self.events) == 1:
            return f"event {self.event_id} ({where})"
        return f"a batch of {len(self.events)} events from event {self.event_id} ({where})"


class HandlerCalls:
    """Calls `handle(event, session)` or `handle_batch(events, session)` of a consumer."""

    def __init__(self, consumer: Any, *, external: bool, idle_tx_timeout: float | None,
                 handler_timeout: float | None) -> None:
        self.consumer = consumer
        self.external = external
        self.idle_tx_timeout = idle_tx_timeout
        self.handler_timeout = handler_timeout
        self.is_async = bool(getattr(consumer, "is_async", False))
        self.batched = bool(getattr(consumer, "batched", False))
        self.running: Running | None = None
        #: A call that outlasted idle_in_transaction_session_timeout, with its duration.
        self.slow: tuple[Running, float] | None = None

    def call(self, session: Session, owned: tuple[SessionTransaction, ...],
             events: Sequence[Event], record: Record, *, batch: bool = False) -> None:
        """Run the handler with the runner's transactions guarded against it. Raises
        HandlerMisuse if it committed, rolled back or closed the session, even when it
        swallowed the refusal; anything else it raised, as it raised it."""
        _guard(session)
        info = session.info
        info[_OWNED] = owned
        info.pop(_MISUSE, None)
        running = Running(list(events), record, time.monotonic(), self.is_async)
        self.running = running
        try:
            self._invoke(session, events, batch)
        except Exception as exc:
            if info.get(_MISUSE):
                raise self.misuse(info.pop(_MISUSE), running) from exc
            raise
        finally:
            self.running = None
            info.pop(_OWNED, None)
            took = time.monotonic() - running.started
            if self.idle_tx_timeout and took >= self.idle_tx_timeout:
                self.slow = (running, took)
        if info.get(_MISUSE):
            raise self.misuse(info.pop(_MISUSE), running)

    def _invoke(self, session: Session, events: Sequence[Event], batch: bool) -> None:
        consumer = self.consumer
        target: Any = session.info.get(ASYNC_SESSION, session) if self.is_async else session
        if self.batched:
            result = consumer.handle_batch(list(events), target)
        else:
            result = consumer.handle(events[0], target)
        if inspect.isawaitable(result):
            from sqlalchemy.util import await_only

            if not self.handler_timeout:
                await_only(result)
                return
            started = time.monotonic()
            try:
                await_only(asyncio.wait_for(result, self.handler_timeout))
            except TimeoutError as exc:
                if time.monotonic() - started < self.handler_timeout:
                    raise  # the handler's own TimeoutError
                raise HandlerTimeout(
                    f"the handler ran longer than handler_timeout "
                    f"({self.handler_timeout:g} s) and was cancelled") from exc

    def explain(self, failure: BaseException) -> str | None:
        """What a batch's lost connection most likely means when a handler call of it
        outlasted idle_in_transaction_session_timeout (None otherwise)."""
        if self.slow is None:
            return None
        running, took = self.slow
        return (f"the handler for {running} ran {took:.0f} s, longer than the database's "
                f"idle_in_transaction_session_timeout ({self.idle_tx_timeout:g} s), which "
                "ends a transaction left idle that long: most likely why the batch's "
                f"connection was lost ({failure}); the batch is retried (make the handler "
                "faster, or raise idle_tx_timeout)")

    def misuse(self, what: str, running: Running) -> HandlerMisuse:
        name = type(self.consumer).__name__
        method = "handle_batch" if self.batched else "handle"
        scope = "this event" if self.external else "the batch"
        return HandlerMisuse(
            f"{name}.{method} {what} on {running}: the runner owns the session's "
            "transaction and commits it itself (use session.flush() to get ids, "
            f"session.begin_nested() for a savepoint of your own). Nothing of {scope} was "
            "committed; the consumer stops")
