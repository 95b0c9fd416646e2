"""An event exists iff its transaction commits, on the real PostgreSQL (sync and async):
no event lost to a Connection, no phantom from an abandoned transaction, and no rows or
event from a nested decorated call that raised, even when its caller caught it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from outbox import InvalidSession, Outbox
from outbox.schema import tables

T = tables.events


@pytest.fixture
def domain(engine: sa.Engine) -> Iterator[sa.Engine]:
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE orders (id serial primary key, amount int not null)"))
    yield engine


def state(engine: sa.Engine) -> tuple[list[int], list[str]]:
    """(order amounts, event types) committed."""
    with engine.connect() as c:
        return (list(c.execute(sa.text("SELECT amount FROM orders ORDER BY id")).scalars()),
                list(c.execute(sa.select(T.c.type).order_by(T.c.position)).scalars()))


def order(session: Session, amount: int) -> None:
    session.execute(sa.text("INSERT INTO orders (amount) VALUES (:a)"), {"a": amount})


async def aorder(session: AsyncSession, amount: int) -> None:
    await session.execute(sa.text("INSERT INTO orders (amount) VALUES (:a)"), {"a": amount})


def pub(box: Outbox, session: Any, type: str) -> None:
    box.publish(session, topic="orders", key="k", type=type, payload={})


def test_a_connection_is_refused_and_a_session_on_it_works(domain: sa.Engine) -> None:
    """Before: the rows committed and the event was silently never written."""
    box = Outbox()
    with domain.begin() as conn:
        conn.execute(sa.text("INSERT INTO orders (amount) VALUES (1)"))
        with pytest.raises(InvalidSession, match="got Connection"):
            pub(box, conn, "Lost")
        with Session(bind=conn) as s:  # what the error advises
            pub(box, s, "ViaSession")
            s.commit()
    assert state(domain) == ([1], ["ViaSession"])


def test_scoped_sessions(domain: sa.Engine, db_url: str) -> None:
    box = Outbox()
    scoped = scoped_session(sessionmaker(domain))
    order(scoped(), 1)
    pub(box, scoped, "Scoped")
    scoped.commit()
    scoped.remove()

    async def run() -> None:
        eng = create_async_engine(db_url)
        ascoped = async_scoped_session(async_sessionmaker(eng), scopefunc=asyncio.current_task)
        await aorder(ascoped(), 2)
        pub(box, ascoped, "AsyncScoped")
        await ascoped.commit()
        await ascoped.remove()
        await eng.dispose()

    asyncio.run(run())
    assert state(domain) == ([1, 2], ["Scoped", "AsyncScoped"])


def test_no_phantom_event_after_close(domain: sa.Engine, db_url: str) -> None:
    """publish(), close() without commit, reuse the session: before, the next commit wrote
    the abandoned event too."""
    box = Outbox()
    s = Session(domain)
    order(s, 1)
    pub(box, s, "Abandoned")
    s.close()
    order(s, 2)
    pub(box, s, "Committed")
    s.commit()
    s.close()

    async def run() -> None:
        eng = create_async_engine(db_url)
        a = AsyncSession(eng)
        pub(box, a, "AsyncAbandoned")
        await a.close()
        await aorder(a, 3)
        pub(box, a, "AsyncCommitted")
        await a.commit()
        await a.close()
        await eng.dispose()

    asyncio.run(run())
    assert state(domain) == ([2, 3], ["Committed", "AsyncCommitted"])


def test_a_nested_call_that_raises_leaves_nothing_even_when_caught(domain: sa.Engine) -> None:
    """Before: the outer call's commit wrote the failed inner call's rows and event."""
    box = Outbox()
    factory = sessionmaker(domain)

    @box.transactional(factory)
    def inner(session: Session, amount: int, fail: bool) -> None:
        order(session, amount)
        pub(box, session, f"Inner{amount}")
        if fail:
            raise ValueError("inner fails")

    @box.transactional(factory)
    def outer(session: Session) -> None:
        order(session, 1)
        pub(box, session, "Outer")
        inner(2, fail=False)
        with contextlib.suppress(ValueError):
            inner(3, fail=True)
        inner(4, fail=False)

    outer()
    assert state(domain) == ([1, 2, 4], ["Outer", "Inner2", "Inner4"])


def test_an_async_nested_call_that_raises_leaves_nothing(domain: sa.Engine, db_url: str) -> None:
    box = Outbox()

    async def run() -> None:
        eng = create_async_engine(db_url)
        factory = async_sessionmaker(eng)

        @box.transactional(factory)
        async def inner(session: AsyncSession, amount: int, fail: bool) -> None:
            await aorder(session, amount)
            pub(box, session, f"Inner{amount}")
            if fail:
                raise ValueError("inner fails")

        @box.transactional(factory)
        async def outer(session: AsyncSession) -> None:
            await aorder(session, 1)
            pub(box, session, "Outer")
            with contextlib.suppress(ValueError):
                await inner(2, fail=True)
            await inner(3, fail=False)

        await outer()
        await eng.dispose()

    asyncio.run(run())
    assert state(domain) == ([1, 3], ["Outer", "Inner3"])
