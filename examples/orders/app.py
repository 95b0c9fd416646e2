"""The orders service: domain rows and their events, written in one transaction."""

from __future__ import annotations

import os
import uuid
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from outbox import Outbox

TOPIC = os.environ.get("DEMO_TOPIC", "orders")

box = Outbox(source="orders-service")
SessionLocal = sessionmaker()  # bound to an engine at start-up: SessionLocal.configure(bind=...)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[uuid.UUID] = mapped_column(unique=True)
    customer_id: Mapped[int]
    amount: Mapped[Decimal] = mapped_column(sa.Numeric(12, 2))
    status: Mapped[str] = mapped_column(sa.String(20))
    version: Mapped[int]


class PaymentDeclined(Exception):
    """Raised after the order and its event were written: both roll back."""


@box.transactional(SessionLocal)
def place_order(session: Session, request_id: uuid.UUID, customer_id: int,
                amount: Decimal) -> int:
    order = Order(request_id=request_id, customer_id=customer_id, amount=amount,
                  status="placed", version=1)
    session.add(order)
    session.flush()  # assigns order.id
    box.publish(session, topic=TOPIC, key=str(order.id), type="OrderPlaced",
                payload={"order_id": order.id, "request_id": request_id,
                         "customer_id": customer_id, "amount": amount, "version": 1})
    if amount > Decimal("900"):
        raise PaymentDeclined(f"order {order.id}: {amount} is over the card limit")
    return order.id


@box.transactional(SessionLocal)
def pay_order(session: Session, order_id: int) -> None:
    order = session.get(Order, order_id, with_for_update=True)
    if order is None or order.status != "placed":
        raise ValueError(f"order {order_id} cannot be paid")
    order.status, order.version = "paid", order.version + 1
    box.publish(session, topic=TOPIC, key=str(order.id), type="OrderPaid",
                payload={"order_id": order.id, "request_id": order.request_id,
                         "version": order.version})
