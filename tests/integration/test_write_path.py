"""Guarantees 1, 3 and 7 on the real PostgreSQL: atomic writes, per-key commit order, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from outbox import Event, Outbox, PayloadNotSerializable, PayloadTooLarge, _unsafe
from outbox.schema import tables

T = tables.events
CLAIM_ORDER = (T.c.shard, T.c.position)  # the order a relay reads a shard in


@pytest.fixture
def domain(engine: sa.Engine) -> Iterator[sa.Engine]:
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE orders (id serial primary key, amount int not null)"))
        c.execute(sa.text("CREATE TABLE versions (key text primary key, version int not null)"))
        c.execute(sa.text(
            "CREATE TABLE event_versions (event_id uuid primary key, key text, version int)"))
    yield engine


def stored(engine: sa.Engine) -> list[sa.Row[tuple[object, ...]]]:
    with engine.connect() as c:
        return list(c.execute(sa.select(T).order_by(*CLAIM_ORDER)))


def test_rollback_leaves_exactly_the_committed_events(domain: sa.Engine) -> None:
    box = Outbox()
    factory = sessionmaker(domain)
    committed: list[Event] = []
    rng = random.Random(3)

    @box.transactional(factory)
    def place(session: Session, n: int, fail: bool) -> Event:
        session.execute(sa.text("INSERT INTO orders (amount) VALUES (:n)"), {"n": n})
        event = box.publish(session, topic="orders", key=f"c{n % 37}", type="OrderPlaced",
                            payload={"n": n, "note": "é" * (n % 5)})
        if fail:
            raise RuntimeError(f"call {n} fails on purpose")
        return event

    for n in range(1000):
        fail = rng.random() < 1 / 3
        try:
            committed.append(place(n, fail))
        except RuntimeError:
            assert fail
    rows = stored(domain)
    assert 550 < len(committed) < 780
    assert {r.event_id: (r.topic, r.key, r.type, bytes(r.payload)) for r in rows} == {
        e.id: (e.topic, e.key, e.type, e.data) for e in committed}
    with domain.connect() as c:
        assert c.scalar(sa.text("SELECT count(*) FROM orders")) == len(committed)


def test_rollback_with_async_session(db_url: str, domain: sa.Engine) -> None:
    async def run() -> list[Event]:
        eng = create_async_engine(db_url)
        box = Outbox()
        factory = async_sessionmaker(eng)
        rng = random.Random(5)
        committed: list[Event] = []

        @box.transactional(factory)
        async def place(session: AsyncSession, n: int, fail: bool) -> Event:
            await session.execute(sa.text("INSERT INTO orders (amount) VALUES (:n)"), {"n": n})
            event = box.publish(session, topic="orders", key=f"c{n % 37}", type="OrderPlaced",
                                payload={"n": n})
            if fail:
                raise RuntimeError("on purpose")
            return event

        for n in range(1000):
            fail = rng.random() < 1 / 3
            with contextlib.suppress(RuntimeError):
                committed.append(await place(n, fail))
        await eng.dispose()
        return committed

    committed = asyncio.run(run())
    rows = stored(domain)
    assert {r.event_id: bytes(r.payload) for r in rows} == {e.id: e.data for e in committed}
    with domain.connect() as c:
        assert c.scalar(sa.text("SELECT count(*) FROM orders")) == len(committed)


def run_concurrent_writers(engine: sa.Engine, *, keys: int, threads: int, per_thread: int,
                           seed: int) -> dict[str, list[int]]:
    """Writers bump a per-key version and publish an event mapped to it, in both orders.

    Returns each key's versions in the relay's claim order.
    """
    box = Outbox()
    factory = sessionmaker(engine)
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO versions SELECT 'k' || g, 0 FROM generate_series(0, :n) g"),
                  {"n": keys - 1})

    def bump(session: Session, key: str) -> int:
        return int(session.execute(sa.text(
            "UPDATE versions SET version = version + 1 WHERE key = :k RETURNING version"),
            {"k": key}).scalar_one())

    @box.transactional(factory)
    def write(session: Session, key: str, publish_first: bool, rng: random.Random) -> None:
        time.sleep(rng.random() * 0.003)
        if publish_first:
            event = box.publish(session, topic="versions", key=key, type="Bumped", payload={})
            time.sleep(rng.random() * 0.003)
            version = bump(session, key)
        else:
            version = bump(session, key)
            time.sleep(rng.random() * 0.003)
            event = box.publish(session, topic="versions", key=key, type="Bumped", payload={})
        session.execute(sa.text("INSERT INTO event_versions VALUES (:e, :k, :v)"),
                        {"e": event.id, "k": key, "v": version})
        time.sleep(rng.random() * 0.003)

    errors: list[BaseException] = []

    def worker(i: int) -> None:
        rng = random.Random(seed * 100 + i)
        try:
            for _ in range(per_thread):
                write(f"k{rng.randrange(keys)}", rng.random() < 0.5, rng)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    with engine.connect() as c:
        rows = c.execute(sa.text(
            "SELECT e.key, v.version FROM outbox_events e "
            "JOIN event_versions v ON v.event_id = e.event_id ORDER BY e.shard, e.position"))
        out: dict[str, list[int]] = defaultdict(list)
        for key, version in rows:
            out[key].append(version)
    return out


def test_concurrent_writers_keep_per_key_commit_order(domain: sa.Engine) -> None:
    seen = run_concurrent_writers(domain, keys=20, threads=8, per_thread=60, seed=1)
    assert sum(len(v) for v in seen.values()) == 8 * 60
    for key, versions in seen.items():
        assert versions == list(range(1, len(versions) + 1)), f"key {key}: {versions}"


def test_the_order_check_fails_without_write_time_ordering(domain: sa.Engine) -> None:
    """The same check, with the key lock and deferred insert switched off, must catch it."""
    with _unsafe.disable("ordering"):
        seen = run_concurrent_writers(domain, keys=2, threads=8, per_thread=40, seed=2)
    broken = [k for k, v in seen.items() if v != list(range(1, len(v) + 1))]
    assert broken, "without write-time ordering, concurrent writers should reorder a key"


@pytest.mark.parametrize("kwargs,error", [
    ({"payload": {"x": object()}}, PayloadNotSerializable),
    ({"payload": "x" * (1024 * 1024 + 1)}, PayloadTooLarge),
])
def test_bad_input_leaves_the_session_usable_for_rollback(
    domain: sa.Engine, kwargs: dict[str, object], error: type[Exception]
) -> None:
    box = Outbox()
    args: dict[str, object] = {"topic": "t", "key": "k", "type": "T", "payload": {}}
    args.update(kwargs)
    with Session(domain) as s:
        s.execute(sa.text("INSERT INTO orders (amount) VALUES (1)"))
        with pytest.raises(error):
            box.publish(s, **args)  # type: ignore[arg-type]
        s.rollback()
        s.execute(sa.text("INSERT INTO orders (amount) VALUES (2)"))
        box.publish(s, topic="t", key="k", type="T", payload={"ok": True})
        s.commit()
    assert [bytes(r.payload) for r in stored(domain)] == [b'{"ok":true}']
    with domain.connect() as c:
        assert c.execute(sa.text("SELECT amount FROM orders")).scalars().all() == [2]
