"""Events published around the commit itself: written, or refused loudly; never dropped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from outbox import ConfigError, InvalidSession, Outbox
from tests.unit.test_publish_session import amounts, types
from tests.unit.test_writer import Base, Order, create_outbox


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(eng)
    create_outbox(eng)
    yield eng
    eng.dispose()


def test_an_event_published_by_a_flush_the_commit_triggers_is_written(
    engine: sa.Engine,
) -> None:
    """A flush hook changes an object after the first flush; the next flush publishes."""
    box = Outbox()
    session = Session(engine)
    order = Order(amount=1)

    def touch(sess: Session, ctx: Any) -> None:
        if order.amount == 1:
            order.amount = 2  # dirty again: the commit must flush once more

    def publish_on_change(sess: Session, ctx: Any, instances: Any) -> None:
        for obj in sess.dirty:
            if isinstance(obj, Order):
                box.publish(sess, topic="t", key="k", type="Changed", payload={})

    sa_event.listen(session, "after_flush_postexec", touch)
    sa_event.listen(session, "before_flush", publish_on_change)
    with session.begin():
        session.add(order)
        box.publish(session, topic="t", key="k", type="Created", payload={})
    session.close()
    assert amounts(engine) == [2]
    assert types(engine) == ["Created", "Changed"]


def test_publishing_from_a_later_before_commit_listener_is_refused(engine: sa.Engine) -> None:
    box = Outbox()
    session = Session(engine)
    box.publish(session, topic="t", key="k", type="First", payload={})  # hooks installed

    def late(sess: Session) -> None:
        box.publish(sess, topic="t", key="k", type="TooLate", payload={})

    sa_event.listen(session, "before_commit", late)
    session.add(Order(amount=5))
    with pytest.raises(InvalidSession, match="during the commit"):
        session.commit()
    session.rollback()
    session.close()
    assert amounts(engine) == [] and types(engine) == []  # nothing half-committed


def test_a_commit_retried_after_the_event_write_failed_still_writes_the_events(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = Outbox()
    real_write = Outbox._write
    calls = {"n": 0}

    def failing_once(self: Outbox, session: Session, queue: list[Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConfigError("shard count check failed (simulated)")
        real_write(self, session, queue)

    monkeypatch.setattr(Outbox, "_write", failing_once)
    session = Session(engine)
    session.add(Order(amount=7))
    box.publish(session, topic="t", key="k", type="Kept", payload={})
    with pytest.raises(ConfigError):
        session.commit()
    session.commit()  # the transaction is still active: the retry must carry the event
    session.close()
    assert amounts(engine) == [7] and types(engine) == ["Kept"]
