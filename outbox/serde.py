"""Serializers: how payloads become bytes in the outbox and back in the consumer, and
how headers are stored in the outbox's JSON column.

JSON is the default. Anything JSON cannot represent faithfully is refused at publish()
time, not discovered by the relay or a consumer later.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import sys
import uuid
from collections.abc import Mapping
from typing import Any, Protocol, cast, runtime_checkable

from outbox.errors import PayloadNotSerializable


@runtime_checkable
class Serializer(Protocol):
    """Turns payloads into bytes and back; `content_type` goes into the record headers."""

    content_type: str

    def dumps(self, payload: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


def _json_default(obj: Any) -> Any:
    if isinstance(obj, dt.datetime | dt.date | dt.time):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, decimal.Decimal):
        return str(obj)  # a string keeps every digit; a float would not
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    model_dump = getattr(obj, "model_dump", None)  # pydantic v2 models
    if callable(model_dump):
        return model_dump(mode="json")
    if isinstance(obj, set | frozenset):
        raise TypeError("a set has no order; pass a sorted list")
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


class JsonSerializer:
    """JSON (UTF-8); encodes datetimes, UUIDs, Decimals, enums, dataclasses, pydantic models."""

    content_type = "application/json"

    def dumps(self, payload: Any) -> bytes:
        try:
            text = json.dumps(
                payload,
                default=_json_default,
                separators=(",", ":"),
                ensure_ascii=False,
                allow_nan=False,
            )
        except (TypeError, ValueError) as exc:
            raise PayloadNotSerializable(f"payload cannot be encoded as JSON: {exc}") from exc
        except RecursionError:
            # Nested too deep for the encoder (and so for a consumer's decoder too).
            raise PayloadNotSerializable(
                "payload cannot be encoded as JSON: it is nested too deeply "
                f"(Python's recursion limit is {sys.getrecursionlimit()})"
            ) from None
        try:
            return text.encode()
        except UnicodeEncodeError as exc:
            raise PayloadNotSerializable(
                "payload cannot be encoded as JSON: a string holds a lone surrogate "
                f"{text[exc.start]!r}, which is not valid Unicode text"
            ) from None

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class BytesSerializer:
    """Raw bytes, passed through untouched (you encode; we carry)."""

    content_type = "application/octet-stream"

    def dumps(self, payload: Any) -> bytes:
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise PayloadNotSerializable(
                f"BytesSerializer takes bytes, got {type(payload).__name__}"
            )
        return bytes(payload)

    def loads(self, data: bytes) -> Any:
        return data


def decode(content_type: str, data: bytes) -> Any:
    """Decode a record's value by its content type (JSON, else the raw bytes)."""
    is_json = _JSON_TYPES.get(content_type)
    if is_json is None:
        base = content_type.split(";", 1)[0].strip().lower()
        is_json = base == "application/json" or base.endswith("+json")
        if len(_JSON_TYPES) < 256 and len(content_type) <= 100:  # the few a consumer meets
            _JSON_TYPES[content_type] = is_json
    if is_json:
        # json.loads on bytes first guesses their encoding in Python: try plain UTF-8,
        # JSON's own, directly; anything it does not parse (a BOM, UTF-16 or -32, or bad
        # JSON) goes to json.loads as it always did, which decides
        if isinstance(data, bytes):
            try:
                return json.loads(data.decode())
            except ValueError:
                pass
        return json.loads(data)
    return data


_JSON_TYPES: dict[str, bool] = {}


def encode_headers(headers: Mapping[str, str | bytes]) -> dict[str, Any] | None:
    """Headers as JSON: str values as they are, bytes values as {"b": hex}."""
    if not headers:
        return None
    return {n: ({"b": v.hex()} if isinstance(v, bytes) else v) for n, v in headers.items()}


def decode_headers(stored: Mapping[str, Any] | None) -> dict[str, str | bytes]:
    if not stored:
        return {}
    return {n: (bytes.fromhex(v["b"]) if isinstance(v, dict) else cast(str, v))
            for n, v in stored.items()}


def json_headers(headers: Mapping[str, str | bytes]) -> str | None:
    """encode_headers, as the JSON text the INSERT takes."""
    encoded = encode_headers(headers)
    return None if encoded is None else json.dumps(encoded)
