"""@Outbox.transactional: nested calls in savepoints, and methods (SQLite, sync and async).

The README's promise: an exception means neither the call's rows nor its events exist,
even for a nested call whose exception the caller catches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from outbox import ConfigError, Outbox
from outbox.schema import make_tables
from tests.unit.test_writer import Base, Order, create_outbox

T = make_tables().events


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(eng)
    create_outbox(eng)
    yield eng
    eng.dispose()


def state(engine: sa.Engine) -> tuple[list[int], list[str]]:
    """(order amounts, event types) committed."""
    with engine.connect() as c:
        return (list(c.execute(sa.select(Order.amount).order_by(Order.id)).scalars()),
                list(c.execute(sa.select(T.c.type).order_by(T.c.position)).scalars()))


def test_a_nested_call_that_raises_leaves_nothing_even_when_caught(engine: sa.Engine) -> None:
    """Before: the inner call joined the outer transaction without a savepoint, so its
    rows and event were committed by the outer call that caught its exception."""
    box = Outbox()
    factory = sessionmaker(engine)

    @box.transactional(factory)
    def inner(session: Session, amount: int, fail: bool) -> None:
        session.add(Order(amount=amount))
        session.flush()
        box.publish(session, topic="t", key="k", type=f"Inner{amount}", payload={})
        if fail:
            raise ValueError("inner fails")

    @box.transactional(factory)
    def outer(session: Session) -> None:
        session.add(Order(amount=1))
        box.publish(session, topic="t", key="k", type="Outer", payload={})
        inner(2, fail=False)
        with pytest.raises(ValueError):
            inner(3, fail=True)
        inner(4, fail=False)

    outer()
    assert state(engine) == ([1, 2, 4], ["Outer", "Inner2", "Inner4"])


def test_an_inner_call_does_not_commit_before_the_outer_one(engine: sa.Engine) -> None:
    """pysqlite starts SQLite's transaction at the first write: without care, the inner
    call's SAVEPOINT would start it and its RELEASE commit the inner rows, before the
    outer call fails."""
    box = Outbox()
    factory = sessionmaker(engine)

    @box.transactional(factory)
    def inner(session: Session) -> None:
        session.add(Order(amount=2))
        session.flush()
        box.publish(session, topic="t", key="k", type="Inner", payload={})

    @box.transactional(factory)
    def outer(session: Session) -> None:
        session.execute(sa.select(1))  # reads only: SQLite's transaction not begun yet
        inner()
        raise RuntimeError("outer fails after inner returned")

    with pytest.raises(RuntimeError):
        outer()
    assert state(engine) == ([], [])


async def _async_setup(path: Path) -> AsyncEngine:
    eng = create_async_engine(f"sqlite+aiosqlite:///{path}")
    async with eng.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.run_sync(create_outbox)
    return eng


def test_async_nested_call_that_raises_leaves_nothing(tmp_path: Path) -> None:
    async def run() -> tuple[list[int], list[str]]:
        eng = await _async_setup(tmp_path / "a.sqlite")
        box = Outbox()
        factory = async_sessionmaker(eng)

        @box.transactional(factory)
        async def inner(session: AsyncSession, amount: int, fail: bool) -> None:
            session.add(Order(amount=amount))
            await session.flush()
            box.publish(session, topic="t", key="k", type=f"Inner{amount}", payload={})
            if fail:
                raise ValueError("inner fails")

        @box.transactional(factory)
        async def outer(session: AsyncSession) -> None:
            await session.execute(sa.select(1))
            box.publish(session, topic="t", key="k", type="Outer", payload={})
            await inner(2, fail=False)
            with pytest.raises(ValueError):
                await inner(3, fail=True)

        @box.transactional(factory)
        async def outer_fails(session: AsyncSession) -> None:
            await session.execute(sa.select(1))
            await inner(5, fail=False)
            raise RuntimeError("outer fails")

        await outer()
        with pytest.raises(RuntimeError):
            await outer_fails()
        async with eng.connect() as c:
            amounts = (await c.execute(sa.select(Order.amount))).scalars().all()
            types = (await c.execute(sa.select(T.c.type).order_by(T.c.position))).scalars()
            out = (list(amounts), list(types))
        await eng.dispose()
        return out

    assert asyncio.run(run()) == ([2], ["Outer", "Inner2"])


def test_methods_get_the_session_after_self(engine: sa.Engine) -> None:
    """Before: the wrapper passed the session first, so `self` was the Session and the
    session was the instance."""
    box = Outbox()
    factory = sessionmaker(engine)
    seen: list[tuple[object, object]] = []

    class Orders:
        @box.transactional(factory)
        def place(self, session: Session, amount: int) -> int:
            seen.append((self, session))
            order = Order(amount=amount)
            session.add(order)
            session.flush()
            box.publish(session, topic="t", key=str(order.id), type="Placed", payload={})
            if amount < 0:
                raise ValueError("negative")
            return order.id

        @box.transactional(factory)
        def place_two(self, session: Session) -> None:
            self.place(10)
            with pytest.raises(ValueError):
                self.place(-1)

        @classmethod
        @box.transactional(factory)
        def count(cls, session: Session) -> int:
            seen.append((cls, session))
            return int(session.scalar(sa.select(sa.func.count()).select_from(Order)) or 0)

        @staticmethod
        @box.transactional(factory)
        def total(session: Session, extra: int) -> int:
            seen.append((None, session))
            return int(session.scalar(sa.select(sa.func.sum(Order.amount))) or 0) + extra

    orders = Orders()
    assert orders.place(5) == 1
    assert Orders.place(orders, 6) == 2
    orders.place_two()
    assert Orders.count() == 3 and orders.count() == 3
    assert Orders.total(100) == 121
    assert all(isinstance(s, Session) for _, s in seen)
    assert [who for who, _ in seen[:2]] == [orders, orders]
    assert seen[-3][0] is Orders
    assert state(engine) == ([5, 6, 10], ["Placed", "Placed", "Placed"])


def test_async_methods_get_the_session_after_self(tmp_path: Path) -> None:
    async def run() -> tuple[object, list[str]]:
        eng = await _async_setup(tmp_path / "a.sqlite")
        box = Outbox()
        factory = async_sessionmaker(eng)

        class Orders:
            @box.transactional(factory)
            async def place(self, session: AsyncSession, amount: int) -> object:
                session.add(Order(amount=amount))
                box.publish(session, topic="t", key="k", type="Placed", payload={})
                return self

        orders = Orders()
        who = await orders.place(3)
        async with eng.connect() as c:
            types = (await c.execute(sa.select(T.c.type))).scalars().all()
        await eng.dispose()
        return who is orders, list(types)

    assert asyncio.run(run()) == (True, ["Placed"])


def test_decorating_in_the_wrong_order_or_without_a_session_parameter_is_refused() -> None:
    box = Outbox()
    factory = sessionmaker()
    with pytest.raises(ConfigError, match="below @classmethod"):
        box.transactional(factory)(classmethod(lambda cls, session: None))
    with pytest.raises(ConfigError, match="below @staticmethod"):
        box.transactional(factory)(staticmethod(lambda session: None))

    def nothing() -> None: ...

    def only_self(self: object) -> None: ...

    with pytest.raises(ConfigError, match="takes no parameter for the session"):
        box.transactional(factory)(nothing)
    with pytest.raises(ConfigError, match="after 'self'"):
        box.transactional(factory)(only_self)
