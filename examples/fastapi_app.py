"""The orders service as an async FastAPI app: `AsyncSession`, `async_sessionmaker`, and the
same decorator on `async def`.

    OUTBOX_DATABASE_URL=postgresql+psycopg://... uvicorn examples.fastapi_app:app

The relay and the consumer are the same commands as in the sync demo.
"""

from __future__ import annotations

import os
from decimal import Decimal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from examples.orders.app import TOPIC, Order
from outbox import Outbox

engine = create_async_engine(os.environ.get("OUTBOX_DATABASE_URL",
                                            "postgresql+psycopg://outbox:outbox@127.0.0.1/outbox"))
Sessions = async_sessionmaker(engine, expire_on_commit=False)
box = Outbox(source="orders-api")
app = FastAPI(title="orders")


class NewOrder(BaseModel):
    customer_id: int
    amount: Decimal = Field(gt=0, le=Decimal("900"))


class Placed(BaseModel):
    order_id: int
    event_id: str


@box.transactional(Sessions)
async def place_order(session: AsyncSession, new: NewOrder) -> Placed:
    import uuid

    order = Order(request_id=uuid.uuid4(), customer_id=new.customer_id, amount=new.amount,
                  status="placed", version=1)
    session.add(order)
    await session.flush()
    event = box.publish(session, topic=TOPIC, key=str(order.id), type="OrderPlaced",
                        payload={"order_id": order.id, "customer_id": new.customer_id,
                                 "amount": new.amount, "version": 1})
    return Placed(order_id=order.id, event_id=str(event.id))


@app.post("/orders", status_code=201)
async def create_order(new: NewOrder) -> Placed:
    """The order row and its OrderPlaced event commit together, or neither does."""
    try:
        placed: Placed = await place_order(new)
        return placed
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
