"""Declaring a consumer: a subclass of IdempotentConsumer (or AsyncIdempotentConsumer),
or a function under `@idempotent_consumer(...)`; `load_consumer` finds one by name."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from outbox.errors import ConfigError, InvalidTopic
from outbox.event import ID_HEADER, Event, validate_topic

_OPTIONS = ("id_header", "max_attempts", "retry_backoff", "dlq_suffix", "external",
            "inbox_retention")


class ConsumerBase:
    """What every consumer declares. Options (class attributes):

      id_header        where the event id is (`ce_id`; e.g. "id" for Debezium)
      max_attempts     handler attempts before the record is dead-lettered, counted in
                       the database: across restarts, crashes and rebalances
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
    #: True for AsyncIdempotentConsumer: its methods are coroutines on an AsyncSession.
    is_async: bool = False

    @property
    def batched(self) -> bool:
        """Whether the class defines its own `handle_batch`."""
        base = AsyncIdempotentConsumer if self.is_async else IdempotentConsumer
        return getattr(type(self), "handle_batch", None) is not base.handle_batch

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
        if self.external and self.batched:
            raise ConfigError(f"{name} defines handle_batch and sets external = True: a batch "
                              "shares one transaction, external mode gives each event its "
                              "own; choose one")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} group={self.group_id!r} topics={list(self.topics)!r}>"


class IdempotentConsumer(ConsumerBase):
    """Subclass it: set `topics` and `group_id`, implement `handle(event, session)`.

    `handle` runs inside the batch's transaction; it must not commit or roll back the
    session. Whatever it writes through `session` commits together with the dedupe
    record, so each event's effects are applied once. Options: see ConsumerBase.

    Define `handle_batch(events, session)` instead (or as well) to take the batch's new
    events in one call: duplicates removed, in partition order, one transaction. If it
    raises, the batch is redone event by event (`handle_batch([event], session)`, each
    under a savepoint), so the failing event is retried or dead-lettered on its own and
    the rest commit.
    """

    def handle(self, event: Event, session: Session) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement handle(event, session)")

    def handle_batch(self, events: list[Event], session: Session) -> None:
        for event in events:
            self.handle(event, session)


class AsyncIdempotentConsumer(ConsumerBase):
    """IdempotentConsumer for async code: `async def handle(event, session)` on an
    AsyncSession (and optionally `async def handle_batch`). Run by `outbox consume` like
    any consumer; `handler_timeout` cancels a call that runs too long (one attempt)."""

    is_async = True

    async def handle(self, event: Event, session: AsyncSession) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement "
                                  "async handle(event, session)")

    async def handle_batch(self, events: list[Event], session: AsyncSession) -> None:
        for event in events:
            await self.handle(event, session)


AnyConsumer = IdempotentConsumer | AsyncIdempotentConsumer


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


class AsyncFunctionConsumer(AsyncIdempotentConsumer):
    """What `@consumer(...)` makes of an `async def f(event, session)`."""

    def __init__(self, fn: Callable[[Event, AsyncSession], Awaitable[None]], *,
                 topics: Sequence[str], group_id: str, **options: Any) -> None:
        self.fn = fn
        self.topics = list(topics)
        self.group_id = group_id
        for name, value in options.items():
            setattr(self, name, value)
        functools.update_wrapper(self, fn)

    async def handle(self, event: Event, session: AsyncSession) -> None:
        await self.fn(event, session)

    def __call__(self, event: Event, session: AsyncSession) -> Awaitable[None]:
        return self.fn(event, session)

    def __repr__(self) -> str:
        return (f"<consumer {getattr(self.fn, '__qualname__', self.fn)} "
                f"group={self.group_id!r} topics={list(self.topics)!r}>")


def idempotent_consumer(
    *, topics: Sequence[str], group_id: str, **options: Any
) -> Callable[[Callable[..., Any]], Any]:
    """Decorator form: `@consumer(topics=["orders"], group_id="g")` on `def f(event, session)`
    (or `async def f(event, session)`, given an AsyncSession).

    Takes the consumer options as keywords (max_attempts=3, external=True...). The result
    is a consumer instance, usable as `outbox consume mod:f`.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown consumer option(s) {unknown}; known: {list(_OPTIONS)}")
    if isinstance(topics, str):
        raise ConfigError(f"topics must be a list of topic names, got the str {topics!r}")

    def wrap(fn: Callable[..., Any]) -> Any:
        kind = AsyncFunctionConsumer if inspect.iscoroutinefunction(fn) else FunctionConsumer
        made = kind(fn, topics=topics, group_id=group_id, **options)
        made.validate()
        return made

    return wrap


def load_consumer(target: str) -> AnyConsumer:
    """`package.module:Name` -> a consumer (a subclass is instantiated)."""
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
    if isinstance(obj, type) and issubclass(obj, ConsumerBase):
        try:
            obj = obj()
        except Exception as exc:
            raise ConfigError(f"cannot instantiate {target}: {type(exc).__name__}: {exc}") \
                from exc
    if not isinstance(obj, IdempotentConsumer | AsyncIdempotentConsumer):
        raise ConfigError(
            f"{target} is {_describe(obj)}, not an IdempotentConsumer: point at a subclass of "
            "outbox.IdempotentConsumer (or AsyncIdempotentConsumer) or at a function "
            "decorated with @consumer(...)")
    return obj


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__name__}"
    if callable(obj):
        return f"the undecorated callable {getattr(obj, '__name__', obj)!r}"
    return f"a {type(obj).__name__}"
