"""The read model: an idempotent consumer projecting order events into `order_view`."""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy.orm import Session

from examples.orders.app import TOPIC
from outbox import Event, IdempotentConsumer

# One upsert per event; `applied` counts how often each event took effect (must be 1).
UPSERT_VIEW = sa.text(
    "INSERT INTO order_view (order_id, status, version) VALUES (:id, :status, :version) "
    "ON CONFLICT (order_id) DO UPDATE SET status = :status, version = :version"
)
LOG_EVENT = sa.text(
    "INSERT INTO projection_log (event_id, order_id, version, projected_at, applied) "
    "VALUES (:event_id, :id, :version, clock_timestamp(), 1) "
    "ON CONFLICT (event_id) DO UPDATE SET applied = projection_log.applied + 1"
)
OUT_OF_ORDER = sa.text(
    "INSERT INTO order_violations (order_id, expected, got) VALUES (:id, :expected, :got)"
)

DDL = [
    "CREATE TABLE IF NOT EXISTS order_view (order_id int PRIMARY KEY, status text, version int)",
    "CREATE TABLE IF NOT EXISTS projection_log (event_id uuid PRIMARY KEY, order_id int, "
    "version int, projected_at timestamptz, applied int)",
    "CREATE TABLE IF NOT EXISTS order_violations (order_id int, expected int, got int)",
]


class OrderProjector(IdempotentConsumer):
    topics = [TOPIC]
    group_id = os.environ.get("DEMO_GROUP", "order-projector")

    def handle(self, event: Event, session: Session) -> None:
        p = event.payload
        current = session.execute(sa.text("SELECT version FROM order_view WHERE order_id = :id"),
                                  {"id": p["order_id"]}).scalar()
        expected = (current or 0) + 1
        if p["version"] != expected:  # an event of this order arrived out of order
            session.execute(OUT_OF_ORDER, {"id": p["order_id"], "expected": expected,
                                           "got": p["version"]})
        status = "placed" if event.type == "OrderPlaced" else "paid"
        session.execute(UPSERT_VIEW, {"id": p["order_id"], "status": status,
                                      "version": max(p["version"], current or 0)})
        session.execute(LOG_EVENT, {"event_id": event.id, "id": p["order_id"],
                                    "version": p["version"]})
