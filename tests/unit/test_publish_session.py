"""What publish() accepts as a session, and when pending events are dropped (SQLite).

An event exists iff the transaction it was published in commits: never a silent loss
(a Connection has no commit hook), never a phantom (an abandoned transaction's event
written by the session's next commit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from outbox import InvalidSession, Outbox
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


def types(engine: sa.Engine) -> list[str]:
    with engine.connect() as c:
        return list(c.execute(sa.select(T.c.type).order_by(T.c.position)).scalars())


def amounts(engine: sa.Engine) -> list[int]:
    with engine.connect() as c:
        return list(c.execute(sa.select(Order.amount).order_by(Order.id)).scalars())


def pub(box: Outbox, session: Any, type: str) -> None:
    box.publish(session, topic="t", key="k", type=type, payload={})


# -- item 3: what publish() accepts ---------------------------------------------------


def test_a_connection_is_refused_instead_of_losing_the_event(engine: sa.Engine) -> None:
    """Before: publish() returned an event, the rows committed, the event was never written."""
    box = Outbox()
    with engine.begin() as conn:
        conn.execute(sa.insert(Order).values(amount=1))
        with pytest.raises(InvalidSession, match=r"got Connection: .*Session\(bind=conn\)"):
            box.publish(conn, topic="t", key="k", type="T", payload={})  # type: ignore[arg-type]
    assert amounts(engine) == [1] and types(engine) == []


def test_the_advice_for_a_connection_works(engine: sa.Engine) -> None:
    box = Outbox()
    with engine.begin() as conn:
        conn.execute(sa.insert(Order).values(amount=1))
        with Session(bind=conn) as session:
            pub(box, session, "ViaConnection")
            session.commit()
    assert amounts(engine) == [1] and types(engine) == ["ViaConnection"]


@pytest.mark.parametrize("make", [
    lambda eng: eng, lambda eng: None, lambda eng: sessionmaker(eng), lambda eng: "session",
])
def test_other_objects_are_refused(engine: sa.Engine, make: Callable[[sa.Engine], Any]) -> None:
    with pytest.raises(InvalidSession, match=r"publish\(\) needs a Session or an AsyncSession"):
        Outbox().publish(make(engine), topic="t", key="k", type="T", payload={})


def test_async_connection_is_refused(tmp_path: Path) -> None:
    async def run() -> None:
        eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.sqlite'}")
        async with eng.begin() as conn:
            with pytest.raises(InvalidSession, match="got AsyncConnection"):
                Outbox().publish(conn, topic="t", key="k", type="T",  # type: ignore[arg-type]
                                 payload={})
        await eng.dispose()

    asyncio.run(run())


def test_scoped_session_publishes_in_its_current_session(engine: sa.Engine) -> None:
    """Before: AttributeError."""
    box = Outbox()
    scoped = scoped_session(sessionmaker(engine))
    scoped.add(Order(amount=5))
    pub(box, scoped, "Scoped")
    scoped.commit()
    pub(box, scoped, "RolledBack")
    scoped.rollback()
    scoped.remove()
    assert amounts(engine) == [5] and types(engine) == ["Scoped"]


def test_async_scoped_session_publishes_in_its_current_session(tmp_path: Path) -> None:
    async def run() -> list[str]:
        eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.sqlite'}")
        async with eng.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.run_sync(create_outbox)
        box = Outbox()
        scoped = async_scoped_session(async_sessionmaker(eng), scopefunc=asyncio.current_task)
        scoped.add(Order(amount=6))
        pub(box, scoped, "AsyncScoped")
        await scoped.commit()
        pub(box, scoped, "RolledBack")
        await scoped.rollback()
        await scoped.remove()
        async with eng.connect() as c:
            rows = (await c.execute(sa.select(T.c.type))).scalars().all()
        await eng.dispose()
        return list(rows)

    assert asyncio.run(run()) == ["AsyncScoped"]


def test_a_session_without_autobegin_needs_a_transaction(engine: sa.Engine) -> None:
    with Session(engine, autobegin=False) as s:
        with pytest.raises(InvalidSession, match=r"call session.begin\(\) first"):
            pub(Outbox(), s, "T")
        with s.begin():
            pub(Outbox(), s, "Begun")
    assert types(engine) == ["Begun"]


# -- item 4: no phantom events ---------------------------------------------------------


def _end_close(s: Session) -> None:
    s.close()


def _end_reset(s: Session) -> None:
    s.reset()


def _end_invalidate(s: Session) -> None:
    s.invalidate()


def _end_rollback(s: Session) -> None:
    s.rollback()


def _end_lost_connection(s: Session) -> None:
    s.connection().invalidate()  # as after a dropped connection
    s.rollback()


@pytest.mark.parametrize("end", [_end_close, _end_reset, _end_invalidate, _end_rollback,
                                 _end_lost_connection])
@pytest.mark.parametrize("begun", [False, True])
def test_an_abandoned_transaction_leaves_no_phantom_event(
    engine: sa.Engine, end: Callable[[Session], None], begun: bool
) -> None:
    """publish(), end the transaction without commit, reuse the session: before, the next
    commit wrote the abandoned event."""
    box = Outbox()
    s = Session(engine)
    if begun:
        s.execute(sa.text("SELECT 1"))
    s.add(Order(amount=1))
    pub(box, s, "Abandoned")
    end(s)
    s.add(Order(amount=2))
    pub(box, s, "Committed")
    s.commit()
    s.close()
    assert types(engine) == ["Committed"]
    assert amounts(engine) == [2]


def test_an_abandoned_async_transaction_leaves_no_phantom_event(tmp_path: Path) -> None:
    async def run() -> list[str]:
        eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.sqlite'}")
        async with eng.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.run_sync(create_outbox)
        box = Outbox()
        s = AsyncSession(eng)
        pub(box, s, "Abandoned")
        await s.close()
        pub(box, s, "Committed")
        await s.commit()
        await s.close()
        async with eng.connect() as c:
            rows = (await c.execute(sa.select(T.c.type))).scalars().all()
        await eng.dispose()
        return list(rows)

    assert asyncio.run(run()) == ["Committed"]


def test_savepoints_keep_their_semantics(engine: sa.Engine) -> None:
    """A rolled-back savepoint drops only its own events (and those of the savepoints it
    holds, released or not); a released one keeps them for the top-level commit."""
    box = Outbox()
    with Session(engine) as s, s.begin():
        pub(box, s, "Outer")
        with s.begin_nested():
            pub(box, s, "Released")
        sp = s.begin_nested()
        pub(box, s, "RolledBack")
        with s.begin_nested():
            pub(box, s, "ReleasedInsideRolledBack")
        sp.rollback()
        pub(box, s, "After")
    assert types(engine) == ["Outer", "Released", "After"]


def test_a_failed_flush_in_a_savepoint_drops_only_that_savepoint(engine: sa.Engine) -> None:
    """The flush's own subtransaction rolls back the savepoint, not the transaction: before,
    this dropped the outer events too, and the commit lost them silently."""
    box = Outbox()
    with Session(engine) as s, s.begin():
        s.add(Order(id=1, amount=1))
        pub(box, s, "Outer")
        with pytest.raises(sa.exc.IntegrityError), s.begin_nested():
            pub(box, s, "Inner")
            s.add(Order(id=1, amount=2))  # duplicate key: the flush fails
            s.flush()
        pub(box, s, "After")
    assert types(engine) == ["Outer", "After"]
    assert amounts(engine) == [1]


def test_events_published_by_a_flush_hook_at_commit_are_written(engine: sa.Engine) -> None:
    """The commit flushes before writing: an event a flush hook publishes is written in
    this transaction (before: it was left over for the next one, or lost)."""
    box = Outbox()
    with Session(engine) as s:
        @sa_event.listens_for(s, "before_flush")
        def domain_events(session: Session, *_: object) -> None:
            for obj in session.new:
                if isinstance(obj, Order):
                    pub(box, session, f"Placed{obj.amount}")

        pub(box, s, "First")
        s.add(Order(amount=7))
        s.commit()  # the flush happens inside commit
        assert types(engine) == ["First", "Placed7"]
        s.add(Order(amount=8))
        s.rollback()
        s.commit()
    assert types(engine) == ["First", "Placed7"]


def test_publishing_into_a_failed_transaction_is_refused(engine: sa.Engine) -> None:
    box = Outbox()
    with Session(engine) as s:
        s.add(Order(id=1, amount=1))
        s.commit()
        s.add(Order(id=1, amount=2))
        with pytest.raises(sa.exc.IntegrityError):
            s.flush()
        with pytest.raises(InvalidSession, match="no longer active"):
            pub(box, s, "Lost")
        s.rollback()
        pub(box, s, "Fine")
        s.commit()
    assert types(engine) == ["Fine"]
