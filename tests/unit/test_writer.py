"""The write path on SQLite: atomicity, joining, savepoints, validation."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from outbox import (
    ConfigError,
    InvalidHeader,
    InvalidKey,
    InvalidTopic,
    Outbox,
    PayloadNotSerializable,
    PayloadTooLarge,
    shardcount,
)
from outbox.keys import shard_of
from outbox.schema import make_tables, validate_prefix
from outbox.serde import decode_headers


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    amount: Mapped[int]


@pytest.fixture
def engine(tmp_path: Path) -> sa.Engine:
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(eng)
    create_outbox(eng)
    return eng


def create_outbox(bind: sa.Engine | sa.Connection) -> None:
    """The outbox tables with their shard rows (what `outbox db upgrade` makes)."""
    tables = make_tables()
    if isinstance(bind, sa.Engine):
        with bind.begin() as conn:
            create_outbox(conn)
        return
    tables.metadata.create_all(bind)
    shardcount.configure(bind, tables, None)


def events(engine: sa.Engine) -> list[sa.Row[tuple[object, ...]]]:
    t = make_tables().events
    with engine.connect() as c:
        return list(c.execute(sa.select(t).order_by(t.c.position)))


def test_commit_writes_event_and_rollback_writes_none(engine: sa.Engine) -> None:
    box = Outbox()
    factory = sessionmaker(engine)

    @box.transactional(factory)
    def place(session: Session, amount: int) -> int:
        order = Order(amount=amount)
        session.add(order)
        session.flush()
        box.publish(session, topic="orders", key=str(order.id), type="OrderPlaced",
                    payload={"id": order.id, "amount": amount}, headers={"h": b"\x01"})
        if amount < 0:
            raise ValueError("negative")
        return order.id

    assert place(10) == 1
    with pytest.raises(ValueError):
        place(-1)
    rows = events(engine)
    assert [(r.key, r.payload, r.type) for r in rows] == [
        ("1", b'{"id":1,"amount":10}', "OrderPlaced")]
    assert decode_headers(rows[0].headers) == {"h": b"\x01"}
    assert rows[0].shard == shard_of("1", 16)
    with factory() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Order)) == 1


def test_nested_decorated_call_joins_the_outer_transaction(engine: sa.Engine) -> None:
    box = Outbox()
    factory = sessionmaker(engine)
    seen: list[Session] = []

    @box.transactional(factory)
    def inner(session: Session) -> None:
        seen.append(session)
        box.publish(session, topic="t", key="k", type="Inner", payload={})

    @box.transactional(factory)
    def outer(session: Session) -> None:
        seen.append(session)
        inner()
        raise RuntimeError("outer fails after inner returned")

    with pytest.raises(RuntimeError):
        outer()
    assert seen[0] is seen[1]
    assert events(engine) == []


def test_rolled_back_savepoint_drops_only_its_events(engine: sa.Engine) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        box.publish(s, topic="t", key="k", type="Kept", payload=1)
        sp = s.begin_nested()
        box.publish(s, topic="t", key="k", type="Dropped", payload=2)
        sp.rollback()
        with s.begin_nested():
            box.publish(s, topic="t", key="k", type="KeptToo", payload=3)
    assert [r.type for r in events(engine)] == ["Kept", "KeptToo"]


@pytest.mark.parametrize("kwargs,error,message", [
    ({"payload": object()}, PayloadNotSerializable, "cannot be encoded as JSON"),
    ({"payload": "x" * 2000}, PayloadTooLarge, "over the limit of 1000 bytes"),
    ({"topic": "bad topic"}, InvalidTopic, "invalid Kafka topic name 'bad topic'"),
    ({"topic": "orders\n"}, InvalidTopic, "invalid Kafka topic name 'orders\\\\n'"),
    ({"key": 42}, InvalidKey, "event key must be a str, got int"),
    ({"headers": {"h": 1.5}}, InvalidHeader, "header values must be str or bytes"),
])
def test_bad_input_is_refused_and_the_session_stays_usable(
    engine: sa.Engine, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    box = Outbox(max_event_bytes=1000)
    args: dict[str, object] = {"topic": "t", "key": "k", "type": "T", "payload": {}}
    args.update(kwargs)
    with Session(engine) as s:
        s.add(Order(amount=1))
        with pytest.raises(error, match=message):
            box.publish(s, **args)  # type: ignore[arg-type]
        box.publish(s, topic="t", key="k", type="Good", payload={})
        s.rollback()
        assert s.scalar(sa.select(sa.func.count()).select_from(Order)) == 0
    assert events(engine) == []


@pytest.mark.parametrize("bad", ["x; drop table users", "adv\n", "\nadv", "", "A", "1x",
                                 "x" * 41, "x" * 40 + "\n"])
def test_table_prefix_is_validated(bad: str) -> None:
    """The prefix is spliced into SQL: a trailing newline must not slip past `$`."""
    with pytest.raises(ConfigError, match="invalid table prefix"):
        Outbox(table_prefix=bad)
    with pytest.raises(ConfigError, match="invalid table prefix"):
        validate_prefix(bad)


def test_valid_table_prefixes() -> None:
    assert validate_prefix("_a9") == "_a9"
    assert validate_prefix("x" * 40) == "x" * 40


def test_decorator_refuses_sync_factory_on_async_function(engine: sa.Engine) -> None:
    box = Outbox()
    with pytest.raises(ConfigError, match="is async"):
        @box.transactional(sessionmaker(engine))
        async def f(session: AsyncSession) -> None: ...


def test_async_session_commit_and_rollback(tmp_path: Path) -> None:
    async def run() -> list[str]:
        eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.sqlite'}")
        async with eng.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.run_sync(create_outbox)
        box = Outbox()
        factory = async_sessionmaker(eng)

        @box.transactional(factory)
        async def place(session: AsyncSession, n: int) -> None:
            session.add(Order(amount=n))
            box.publish(session, topic="t", key=str(n), type="Placed", payload={"n": n})
            if n % 2:
                raise ValueError(n)

        for n in range(6):
            with contextlib.suppress(ValueError):
                await place(n)
        t = make_tables().events
        async with eng.connect() as c:
            keys = (await c.execute(sa.select(t.c.key).order_by(t.c.position))).scalars().all()
        await eng.dispose()
        return list(keys)

    assert asyncio.run(run()) == ["0", "2", "4"]
