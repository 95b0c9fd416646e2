"""The async FastAPI example: an order and its event commit together over AsyncSession."""

from __future__ import annotations

import importlib

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from outbox.schema import tables


def test_post_order_writes_the_row_and_its_event(
    db_url: str, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOX_DATABASE_URL", db_url)
    from examples.orders.app import Base

    Base.metadata.create_all(engine)
    import examples.fastapi_app as mod

    mod = importlib.reload(mod)  # bind its engine to this test's database
    with TestClient(mod.app) as client:
        ok = client.post("/orders", json={"customer_id": 3, "amount": "12.50"})
        refused = client.post("/orders", json={"customer_id": 3, "amount": "-1"})
    assert ok.status_code == 201, ok.text
    assert refused.status_code == 422
    with engine.connect() as c:
        events = c.execute(sa.select(tables.events.c.event_id, tables.events.c.key)).all()
        orders = c.execute(sa.text("SELECT id FROM orders")).scalars().all()
    assert [(str(e), k) for e, k in events] == [(ok.json()["event_id"],
                                                 str(ok.json()["order_id"]))]
    assert orders == [ok.json()["order_id"]]
