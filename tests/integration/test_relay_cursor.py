"""The claim cursor skips what a shard already acknowledged, and still finds an event whose
transaction drew a lower position but committed after higher ones were sent."""

from __future__ import annotations

import time

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.dburl import libpq_url
from outbox.publisher import InMemoryPublisher
from outbox.relay import Relay, RelayConfig
from outbox.writer import shard_of


def _publish(engine: sa.Engine, key: str, n: int) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        for i in range(n):
            box.publish(s, topic="t", key=key, type="T", payload={"i": i})


def _late_row(conn: psycopg.Connection[object], key: str) -> int:
    """Insert an event inside a transaction left open: its position is drawn now."""
    row = conn.execute(
        "INSERT INTO outbox_events (event_id, topic, key, type, payload, content_type, "
        "source, occurred_at, shard) VALUES (gen_random_uuid(), 't', %s, 'Late', '{}', "
        "'application/json', 'test', now(), %s) RETURNING position",
        (key, shard_of(key, 16))).fetchone()
    assert row is not None
    return int(row[0])


def _sent_types(publisher: InMemoryPublisher) -> list[bytes]:
    return [dict(r.headers)["ce_type"] for r in publisher.records]


@pytest.mark.parametrize("rescan", [0.2, 3600.0], ids=["rescan", "no-rescan"])
def test_an_event_committed_late_below_the_cursor_is_still_sent(
    engine: sa.Engine, db_url: str, rescan: float
) -> None:
    publisher = InMemoryPublisher()
    relay = Relay(RelayConfig(db_url=db_url, rescan_interval=rescan), lambda: publisher)
    try:
        _publish(engine, "other", 5)
        relay.step(wait=False)  # the first claim scans from the start
        late_conn = psycopg.connect(libpq_url(db_url))
        same_shard = next(k for k in (f"late-{i}" for i in range(1000))
                          if shard_of(k, 16) == shard_of("other", 16))
        late_position = _late_row(late_conn, same_shard)  # drawn, not committed
        _publish(engine, "other", 5)  # higher positions in the same shard, committed
        deadline = time.monotonic() + 5
        while len(publisher.records) < 10 and time.monotonic() < deadline:
            relay.step(wait=False)
        assert len(publisher.records) == 10
        assert relay._cursor[shard_of("other", 16)] > late_position
        late_conn.commit()  # now it exists, below the cursor of its shard
        late_conn.close()
        deadline = time.monotonic() + 2
        while b"Late" not in _sent_types(publisher) and time.monotonic() < deadline:
            relay.step(wait=False)
            time.sleep(0.05)
    finally:
        relay._drop_connection()
    if rescan < 1:
        assert b"Late" in _sent_types(publisher)
    else:  # without the periodic rescan the cursor would strand it: the rescan matters
        assert b"Late" not in _sent_types(publisher)
