"""Bad text must never cost the caller's transaction, on the real PostgreSQL.

What PostgreSQL refuses at commit (a NUL in a text column: key, type, source) and what
cannot be encoded at all (lone surrogates, too-deep payloads) is refused by publish(),
so the caller's rows still commit. What it stores fine (a NUL in a header, kept
JSON-escaped, or inside a JSON payload, kept in bytea) is accepted and comes back as
it went in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox.writer
from outbox import Outbox, PublishError
from outbox.schema import tables
from outbox.serde import decode_headers

T = tables.events


@pytest.fixture
def domain(engine: sa.Engine) -> Iterator[sa.Engine]:
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE orders (id serial primary key, amount int not null)"))
    yield engine


def orders(engine: sa.Engine) -> list[int]:
    with engine.connect() as c:
        return list(c.execute(sa.text("SELECT amount FROM orders ORDER BY id")).scalars())


def events(engine: sa.Engine) -> list[sa.Row[Any]]:
    with engine.connect() as c:
        return list(c.execute(sa.select(T).order_by(T.c.position)))


def deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


REFUSED = [
    {"key": "order\x0042"},
    {"type": "Order\x00Placed"},
    {"key": "order-\ud800"},
    {"type": "\udc00"},
    {"headers": {"h": "\ud800"}},
    {"headers": {"\ud800": "v"}},
    {"payload": {"note": "\ud83d\ude00"}},
    {"payload": deep(100_000)},
]


@pytest.mark.parametrize("fields", REFUSED)
def test_refused_text_leaves_the_callers_transaction_intact(
    domain: sa.Engine, fields: dict[str, Any]
) -> None:
    """Before: publish() accepted the NULs and the commit failed with DataError, losing the
    order; surrogates and depth raised errors that are not PublishErrors."""
    box = Outbox()
    args: dict[str, Any] = {"topic": "orders", "key": "k", "type": "T", "payload": {}}
    args.update(fields)
    with Session(domain) as s, s.begin():
        s.execute(sa.text("INSERT INTO orders (amount) VALUES (1)"))
        with pytest.raises(PublishError):
            box.publish(s, **args)
        box.publish(s, topic="orders", key="k", type="Good", payload={})
    assert orders(domain) == [1]
    assert [r.type for r in events(domain)] == ["Good"]


@pytest.mark.parametrize("fields", [{"key": "order\x0042"}, {"type": "Order\x00Placed"}])
def test_without_the_check_postgresql_fails_the_commit(
    domain: sa.Engine, fields: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The premise of the refusal: the same event, let through, fails the whole commit."""
    monkeypatch.setattr(outbox.writer, "key_size", lambda key: len(key.encode()))
    monkeypatch.setattr(outbox.writer, "type_size", lambda t: len(t.encode()))
    args: dict[str, Any] = {"topic": "orders", "key": "k", "type": "T", "payload": {}}
    args.update(fields)
    with (pytest.raises(sa.exc.DataError, match="cannot contain NUL"), Session(domain) as s,
          s.begin()):
        s.execute(sa.text("INSERT INTO orders (amount) VALUES (1)"))
        Outbox().publish(s, **args)
    assert orders(domain) == []


def test_a_nul_in_the_source_fails_every_commit_so_outbox_refuses_it(domain: sa.Engine) -> None:
    box = Outbox()
    box.source = "shop\x00"  # what Outbox(source=...) now refuses with ConfigError
    with pytest.raises(sa.exc.DataError), Session(domain) as s, s.begin():
        s.execute(sa.text("INSERT INTO orders (amount) VALUES (1)"))
        box.publish(s, topic="orders", key="k", type="T", payload={})
    assert orders(domain) == []


@pytest.mark.parametrize("per_commit", [1, 3])  # the one-event and the array statement
def test_text_postgresql_stores_is_accepted_and_comes_back_unchanged(
    domain: sa.Engine, per_commit: int
) -> None:
    box = Outbox()
    headers: dict[str, str | bytes] = {"nul\x00name": "v", "value": "a\x00b", "raw": b"\x00\xff",
                                       "ünï": "🙂"}
    payload = {"note": "a\x00b", "emoji": "🙂"}
    with Session(domain) as s, s.begin():
        s.execute(sa.text("INSERT INTO orders (amount) VALUES (1)"))
        published = [box.publish(s, topic="orders", key="ключ-🙂", type="Заказ", payload=payload,
                                 headers=headers) for _ in range(per_commit)]
    rows = events(domain)
    assert orders(domain) == [1]
    assert [r.event_id for r in rows] == [e.id for e in published]
    for row, event in zip(rows, published, strict=True):
        assert decode_headers(row.headers) == headers
        assert bytes(row.payload) == event.data
        assert box.serializer.loads(bytes(row.payload)) == payload
        assert (row.key, row.type) == ("ключ-🙂", "Заказ")
