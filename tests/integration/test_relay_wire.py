"""What the relay sends is the event's own record, byte for byte (docs/design.md, "Wire
format"), though PostgreSQL encodes its headers in the claim."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Event, Outbox
from outbox.publisher import InMemoryPublisher
from outbox.testing import drain


def test_relayed_records_equal_the_events_own_records(engine: sa.Engine, db_url: str) -> None:
    box = Outbox()
    published: list[Event] = []
    with Session(engine) as s, s.begin():
        published.append(box.publish(s, topic="t", key="k1", type="A", payload={"x": 1}))
        published.append(box.publish(s, topic="t", key="ключ", type="B", payload=[1, "é"],
                                     headers={"trace": "abc", "raw": b"\x00\xff"}))
    with Session(engine) as s, s.begin():  # a whole second: no microseconds to print
        e = box.publish(s, topic="t", key="k2", type="C", payload=None)
        s.flush()
    with engine.begin() as c:
        c.execute(sa.text("UPDATE outbox_events SET occurred_at = :t WHERE event_id = :id"),
                  {"t": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "id": e.id})
    publisher = InMemoryPublisher()
    assert drain(db_url, publisher) == 3
    got = {dict(r.headers)["ce_id"].decode(): (r.key, r.value, r.headers)
           for r in publisher.records}
    for event in published:
        key, value, headers = event.to_record()
        assert got[str(event.id)] == (key, value, headers)
    assert dict(got[str(e.id)][2])["ce_time"] == b"2026-01-02T03:04:05.000000Z"


def test_the_naive_claim_of_the_shards_switch_sends_the_same_records(
    engine: sa.Engine, db_url: str
) -> None:
    """UNSAFE=shards must still relay everything (only out of order), or the chaos suite
    cannot show what removing ownership costs."""
    from outbox import _unsafe

    box = Outbox()
    with Session(engine) as s, s.begin():
        events = [box.publish(s, topic="t", key=f"k{i}", type="T", payload={"i": i})
                  for i in range(20)]
    publisher = InMemoryPublisher()
    with _unsafe.disable("shards"):
        assert drain(db_url, publisher) == 20
    got = {dict(r.headers)["ce_id"].decode(): (r.key, r.value, r.headers)
           for r in publisher.records}
    assert all(got[str(e.id)] == e.to_record() for e in events)
