"""Text publish() refuses because PostgreSQL or Kafka cannot carry it, and text it keeps.

The commit-time failures these prevent are shown on the real PostgreSQL in
tests/integration/test_publish_text.py; here, the refusals and their messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session

from outbox import (
    ConfigError,
    InvalidHeader,
    InvalidKey,
    JsonSerializer,
    Outbox,
    PayloadNotSerializable,
    PublishError,
)
from outbox.event import validate_headers

SURROGATE = "\ud800"


@pytest.fixture
def session() -> Iterator[Session]:
    with Session() as s:
        yield s


def deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("fields,error,message", [
    ({"key": "a\x00b"}, InvalidKey, r"event key contains a NUL character .* at index 1"),
    ({"type": "Placed\x00"}, InvalidHeader, r"event type contains a NUL character"),
    ({"key": "k" + SURROGATE}, InvalidKey, r"event key contains a lone surrogate '\\ud800'"),
    ({"type": SURROGATE}, InvalidHeader, r"event type contains a lone surrogate"),
    ({"headers": {"h": "v" + SURROGATE}}, InvalidHeader, r"header 'h' contains a lone surr"),
    ({"headers": {"\udc00": "v"}}, InvalidHeader, r"header name '\\udc00' contains a lone"),
    ({"payload": {"s": "\ud83d\ude00"}}, PayloadNotSerializable, r"lone surrogate '\\ud83d'"),
    ({"payload": deep(100_000)}, PayloadNotSerializable, r"nested too deeply"),
])
def test_text_that_cannot_be_stored_or_sent_is_refused_naming_the_field(
    session: Session, fields: dict[str, Any], error: type[PublishError], message: str
) -> None:
    """Before: a NUL in the key or type failed the commit (losing the caller's rows), a
    lone surrogate raised UnicodeEncodeError and a deep payload RecursionError, neither
    a PublishError."""
    args: dict[str, Any] = {"topic": "t", "key": "k", "type": "T", "payload": {}}
    args.update(fields)
    with pytest.raises(error, match=message):
        Outbox().publish(session, **args)
    assert isinstance(error("x"), PublishError)


@pytest.mark.parametrize("fields", [
    {"headers": {"h": "a\x00b"}},  # stored JSON-escaped, sent as bytes: fine
    {"headers": {"h\x00": "v"}},
    {"headers": {"raw": b"\x00\xff"}},
    {"payload": {"s": "a\x00b"}},  # JSON escapes it; the payload column is bytea
    {"key": "ключ-🙂", "type": "Заказ", "headers": {"ü": "🙂"}},  # real non-ASCII text
    {"payload": deep(200)},
])
def test_text_both_sides_carry_is_accepted(session: Session, fields: dict[str, Any]) -> None:
    args: dict[str, Any] = {"topic": "t", "key": "k", "type": "T", "payload": {}}
    args.update(fields)
    event = Outbox().publish(session, **args)
    key, value, headers = event.to_record()  # the relay can encode every part
    assert key == args["key"].encode() and value == event.data
    assert dict(headers[6:]) == {n: v if isinstance(v, bytes) else v.encode()
                                 for n, v in (args.get("headers") or {}).items()}


@pytest.mark.parametrize("kwargs,message", [
    ({"source": "shop\x00"}, r"source contains a NUL character"),
    ({"source": "shop" + SURROGATE}, r"source contains a lone surrogate"),
    ({"source": ""}, r"source must be a non-empty str"),
    ({"source": 5}, r"source must be a non-empty str, got 5"),
])
def test_source_is_checked_when_the_outbox_is_made(kwargs: dict[str, Any], message: str) -> None:
    """Before: a NUL in the source failed every commit that published an event."""
    with pytest.raises(ConfigError, match=message):
        Outbox(**kwargs)


def test_a_serializer_content_type_is_checked_too() -> None:
    class Weird(JsonSerializer):
        content_type = "application/json\x00"

    with pytest.raises(ConfigError, match=r"serializer.content_type contains a NUL"):
        Outbox(serializer=Weird())


def test_a_serializer_that_returns_text_is_refused(session: Session) -> None:
    class Text(JsonSerializer):
        def dumps(self, payload: Any) -> bytes:
            return "not bytes"  # type: ignore[return-value]

    with pytest.raises(PayloadNotSerializable, match=r"Text.dumps\(\) returned str, not bytes"):
        Outbox(serializer=Text()).publish(session, topic="t", key="k", type="T", payload={})


@pytest.mark.parametrize("name", ["ce_id", "CE_ID", "Ce_Type", "ce_traceparent", "CE_X",
                                  "content-type", "Content-Type", "CONTENT-TYPE"])
def test_reserved_headers_in_any_case(session: Session, name: str) -> None:
    """Before: only the six exact lower-case names were reserved; `CE_ID` or
    `Content-Type` went out beside the outbox's own."""
    with pytest.raises(InvalidHeader, match="reserved, in any case"):
        validate_headers({name: "x"})
    with pytest.raises(InvalidHeader, match="reserved, in any case"):
        Outbox().publish(session, topic="t", key="k", type="T", payload={}, headers={name: "x"})


@pytest.mark.parametrize("name", ["c", "ce", "cex", "content", "content-types", "x-ce_id"])
def test_names_that_only_look_reserved_are_accepted(name: str) -> None:
    assert validate_headers({name: "x"}) == {name: "x"}
