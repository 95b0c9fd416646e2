"""Serializers: what they encode, and the errors for what they refuse."""

import dataclasses
import datetime as dt
import decimal
import json
import uuid

import pydantic
import pytest

from outbox import BytesSerializer, JsonSerializer, PayloadNotSerializable


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Model(pydantic.BaseModel):
    name: str
    at: dt.datetime


def test_json_encodes_the_usual_types() -> None:
    u = uuid.UUID(int=1)
    data = JsonSerializer().dumps({
        "when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "day": dt.date(2026, 1, 2),
        "id": u, "amount": decimal.Decimal("10.10"), "p": Point(1, 2),
        "m": Model(name="n", at=dt.datetime(2026, 1, 1)),
    })
    assert json.loads(data) == {
        "when": "2026-01-01T00:00:00+00:00", "day": "2026-01-02", "id": str(u),
        "amount": "10.10", "p": {"x": 1, "y": 2}, "m": {"name": "n", "at": "2026-01-01T00:00:00"},
    }


@pytest.mark.parametrize("bad,why", [
    (object(), "object of type object is not JSON serializable"),
    ({"s": {1, 2}}, "a set has no order"),
    ({"n": float("nan")}, "Out of range float values"),
    ({"f": lambda: 1}, "object of type function"),
])
def test_json_refuses_with_a_clear_error(bad: object, why: str) -> None:
    with pytest.raises(PayloadNotSerializable, match="cannot be encoded as JSON") as info:
        JsonSerializer().dumps(bad)
    assert why in str(info.value)


def test_bytes_serializer() -> None:
    s = BytesSerializer()
    assert s.dumps(b"\x00x") == b"\x00x" and s.loads(b"ab") == b"ab"
    with pytest.raises(PayloadNotSerializable, match="takes bytes, got str"):
        s.dumps("text")


def test_json_refuses_deep_and_non_unicode_payloads_as_publish_errors() -> None:
    """Before: RecursionError and UnicodeEncodeError escaped, not PayloadNotSerializable."""
    deep: object = 1
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(PayloadNotSerializable, match="nested too deeply"):
        JsonSerializer().dumps(deep)
    with pytest.raises(PayloadNotSerializable, match="lone surrogate"):
        JsonSerializer().dumps({"s": "\udfff"})
    assert JsonSerializer().dumps({"s": "a\x00"}) == b'{"s":"a\\u0000"}'
