"""What a user's own test suite needs: an in-memory publisher and a relay run to empty,
and an in-memory Kafka for consumers.

    publisher = InMemoryPublisher()
    drain(db_url, publisher)            # every committed event is now in publisher.records

No sleeping in tests waiting for delivery: `drain` returns when the outbox is empty.

    broker = InMemoryBroker()           # topics, partitions, groups, commits, rebalances
    broker.produce_event(event)
    runner = ConsumerRunner(Projector(), db_url=url, source=broker.source("g"),
                            dead_letters=broker.publisher())
    runner.run_once()                   # the real consumer loop, no Kafka
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from outbox import tracing
from outbox.consumer.memory import (
    BrokerDown,
    BrokerPublisher,
    InMemoryBroker,
    InMemorySource,
    RecordTooLarge,
)
from outbox.dburl import sqlalchemy_url
from outbox.event import kafka_headers
from outbox.publisher import InMemoryPublisher, Publisher, Record
from outbox.relay import Relay, RelayConfig
from outbox.schema import DEFAULT_PREFIX, make_tables
from outbox.serde import decode_headers


def drain(db_url: str, publisher: Publisher, *, timeout: float = 60.0,
          config: RelayConfig | None = None) -> int:
    """Run one relay until the outbox holds no publishable event.

    Returns the number of events published. Raises TimeoutError if events remain
    (e.g. retries backing off) after `timeout` seconds. On SQLite this is the relay:
    one process, shards in position order, no locks (SQLite has one writer anyway).
    """
    if sqlalchemy_url(db_url).startswith("sqlite"):
        return _drain_sqlite(db_url, publisher, timeout, config)
    cfg = config or RelayConfig(db_url=db_url)
    relay = Relay(cfg, lambda: publisher)
    deadline = time.monotonic() + timeout
    try:
        while True:
            relay.step(wait=False)
            conn = relay._connection()
            if relay.owned_shards and not relay.store.has_pending(conn, relay.owned_shards) \
                    and len(relay.owned_shards) == relay.num_shards:
                return relay.published
            if time.monotonic() > deadline:
                raise TimeoutError(f"outbox not drained after {timeout}s")
            time.sleep(0.01)
    finally:
        relay._drop_connection()


def _drain_sqlite(db_url: str, publisher: Publisher, timeout: float,
                  config: RelayConfig | None) -> int:
    prefix = config.table_prefix if config else DEFAULT_PREFIX
    events = make_tables(prefix).events
    engine = sa.create_engine(db_url)
    published = 0
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.select(events).where(events.c.published_at.is_(None))
                    .order_by(events.c.shard, events.c.position).limit(1000)).all()
            if not rows:
                return published
            records = [Record(r.topic, r.key.encode(), r.payload, kafka_headers(
                event_id=r.event_id, type=r.type, source=r.source, occurred_at=r.occurred_at,
                content_type=r.content_type, headers=decode_headers(r.headers)))
                for r in rows]
            with tracing.send_span(records, "drain"):
                sent = [(r, publisher.send(rec.topic, rec.key, rec.value, rec.headers))
                        for r, rec in zip(rows, records, strict=True)]
            while not all(d.done() for _, d in sent):
                publisher.flush(timeout=1.0)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Kafka did not acknowledge within {timeout}s")
            halted: set[int] = set()
            acked = []
            for r, d in sent:  # each shard's acknowledged prefix, as the relay does
                if r.shard in halted:
                    continue
                if d.error() is not None:
                    halted.add(r.shard)
                    continue
                acked.append(r.position)
            with engine.begin() as conn:
                conn.execute(events.delete().where(events.c.position.in_(acked)))
            published += len(acked)
            if halted:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"outbox not drained after {timeout}s")
                publisher.recover()
                time.sleep(0.05)
    finally:
        engine.dispose()


__all__ = ["BrokerDown", "BrokerPublisher", "InMemoryBroker", "InMemoryPublisher",
           "InMemorySource", "Record", "RecordTooLarge", "drain"]
