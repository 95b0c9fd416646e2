"""The event envelope, its id (UUIDv7), validation, and the CloudEvents 1.0 Kafka mapping.

Binary content mode: the Kafka value is the payload bytes, the metadata travels in
`ce_*` headers, and the Kafka key is the event key. See docs/design.md, "Wire format".
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from outbox.errors import (
    InvalidHeader,
    InvalidKey,
    InvalidTopic,
    MalformedRecord,
    OutboxError,
)

SPEC_VERSION = "1.0"
SPEC_HEADER, SPEC_VALUE = "ce_specversion", SPEC_VERSION.encode()
ID_HEADER = "ce_id"
DEFAULT_SOURCE = "transactional-outbox"

HeaderValue = str | bytes
Headers = Mapping[str, HeaderValue]
KafkaHeaders = list[tuple[str, bytes]]

# fullmatch, never `$`: `$` also matches before a trailing newline, which Kafka refuses.
_TOPIC_RE = re.compile(r"[a-zA-Z0-9._-]{1,249}")
# Topics the broker keeps for itself and refuses appends to.
_INTERNAL_TOPICS = frozenset(
    {"__consumer_offsets", "__transaction_state", "__cluster_metadata", "__share_group_state"}
)
_RESERVED_HEADERS = frozenset(
    {"ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type"}
)

_uuid_lock = threading.Lock()
_uuid_last = (0, 0)  # (unix ms, 12-bit counter) of the last id handed out


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562, version 7), monotonic within this process.

    The 12 `rand_a` bits hold a counter for ids made in the same millisecond, so ids
    from one process sort in creation order (RFC 9562 section 6.2, method 1).
    """
    global _uuid_last
    with _uuid_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, counter = _uuid_last
        if ms <= last_ms:
            ms, counter = last_ms, counter + 1
            if counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                ms, counter = last_ms + 1, 0
        else:
            counter = int.from_bytes(os.urandom(2), "big") & 0x3FF  # leave room to count up
        _uuid_last = (ms, counter)
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
    return uuid.UUID(int=value)


def validate_topic(topic: object) -> str:
    """Refuse names Kafka would refuse, before they reach the outbox table."""
    if not isinstance(topic, str):
        raise InvalidTopic(f"topic must be a str, got {type(topic).__name__}")
    if topic in {".", ".."} or not _TOPIC_RE.fullmatch(topic):
        raise InvalidTopic(
            f"invalid Kafka topic name {topic!r}: use 1 to 249 characters of "
            "ASCII letters, digits, '.', '_' and '-', and not '.' or '..'"
        )
    if topic in _INTERNAL_TOPICS:
        raise InvalidTopic(f"{topic!r} is an internal topic of Kafka: the broker refuses writes")
    return topic


def text_size(
    text: str, what: str, error: type[OutboxError], *, nul_ok: bool = False
) -> int:
    """The UTF-8 length of text bound for PostgreSQL and Kafka; refuses what neither carries.

    PostgreSQL's text columns cannot hold a NUL character: the event's INSERT would fail
    at commit and take the caller's own rows with it, so it is refused here (`nul_ok`
    where the text is stored JSON-escaped, as header names and values are). A lone
    surrogate has no UTF-8 encoding at all. Cheap: one scan for NUL, and an ASCII fast
    path before encoding.
    """
    if not nul_ok and "\x00" in text:
        raise error(
            f"{what} contains a NUL character ('\\x00') at index {text.index(chr(0))}: "
            "PostgreSQL cannot store it in a text column"
        )
    if text.isascii():
        return len(text)
    try:
        return len(text.encode())
    except UnicodeEncodeError as exc:
        raise error(
            f"{what} contains a lone surrogate {text[exc.start]!r} at index {exc.start}: "
            "it is not valid Unicode text and has no UTF-8 encoding"
        ) from None


def key_size(key: object) -> int:
    """The key orders events and picks the Kafka partition: a str; its UTF-8 length."""
    if not isinstance(key, str):
        raise InvalidKey(
            f"event key must be a str, got {type(key).__name__}: "
            "convert ids explicitly, e.g. key=str(order.id)"
        )
    return text_size(key, "event key", InvalidKey)


def validate_key(key: object) -> str:
    key_size(key)
    return cast(str, key)


def is_reserved_header(name: str) -> bool:
    """`ce_*` and `content-type`, in any case: the outbox sets those, and a consumer that
    compares names without case must not see a user's copy shadow them."""
    if name[0] not in "cC":  # most names: one comparison
        return False
    return name[:3].lower() == "ce_" or (len(name) == 12 and name.lower() == "content-type")


def check_headers(headers: Headers | None) -> tuple[dict[str, HeaderValue], int]:
    """User headers (str names, str or bytes values, none reserved), copied, and the
    bytes their names and values take in the Kafka record (with varint lengths)."""
    if headers is None:
        return {}, 0
    if type(headers) is not dict and not isinstance(headers, Mapping):
        raise InvalidHeader(f"headers must be a mapping, got {type(headers).__name__}")
    out: dict[str, HeaderValue] = {}
    size = 0
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise InvalidHeader(f"header name must be a non-empty str, got {name!r}")
        if is_reserved_header(name):
            raise InvalidHeader(
                f"header {name!r} is set by the outbox itself: ce_* and content-type "
                "headers are reserved, in any case"
            )
        if isinstance(value, bytes):
            value_len = len(value)
        elif isinstance(value, str):  # (ASCII: no surrogate, and a NUL is fine here)
            value_len = len(value) if value.isascii() else text_size(
                value, f"header {name!r}", InvalidHeader, nul_ok=True)
        else:
            raise InvalidHeader(
                f"header {name!r} has a value of type {type(value).__name__}; "
                "header values must be str or bytes"
            )
        name_len = len(name) if name.isascii() else text_size(
            name, f"header name {name!r}", InvalidHeader, nul_ok=True)
        size += varint_size(name_len) + name_len + varint_size(value_len) + value_len
        out[name] = value
    return out, size


def validate_headers(headers: Headers | None) -> dict[str, HeaderValue]:
    """User headers: str names, str or bytes values, none that shadow CloudEvents ones."""
    return check_headers(headers)[0]


def type_size(event_type: object) -> int:
    """The event type (ce_type): a non-empty str; its UTF-8 length."""
    if not isinstance(event_type, str) or not event_type:
        raise InvalidHeader(f"event type must be a non-empty str, got {event_type!r}")
    return text_size(event_type, "event type", InvalidHeader)


def validate_type(event_type: object) -> str:
    type_size(event_type)
    return cast(str, event_type)


# -- the size Kafka counts ------------------------------------------------------------
#
# The broker compares a whole record batch with message.max.bytes (a topic's
# max.message.bytes): the batch header, 61 bytes in magic v2 (12 of them the offset and
# length prefix), then each record framed with varints: its length, attributes,
# timestamp delta, offset delta, key length, value length, header count, and each
# header's name and value lengths. kafka-python puts a record larger than its
# batch_size alone in a batch, with timestamp and offset deltas of 0.

BATCH_HEADER_BYTES = 61
# ce_time at its longest ("2026-01-02T03:04:05.678000Z", 27 bytes; 20 when the
# microseconds are 0), so that publish()'s count is never under the real one.
_LONGEST_TIME = datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=UTC)


def varint_size(n: int) -> int:
    """Bytes of Kafka's zigzag varint for a length n >= 0 (or -1, a null)."""
    if -64 <= n < 64:  # the common short lengths, without the loop
        return 1
    z = (n << 1) ^ (n >> 63)
    size = 1
    while z > 0x7F:
        z >>= 7
        size += 1
    return size


def record_size(
    key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes | None]]
) -> int:
    """The bytes of an uncompressed magic-v2 record batch that holds this record alone:
    what the broker compares with message.max.bytes."""
    body = 3  # attributes, timestamp delta 0, offset delta 0
    body += 1 if key is None else varint_size(len(key)) + len(key)
    body += 1 if value is None else varint_size(len(value)) + len(value)
    count = 0
    for name, raw in headers:
        name_len = len(name.encode())
        body += varint_size(name_len) + name_len
        body += 1 if raw is None else varint_size(len(raw)) + len(raw)
        count += 1
    body += varint_size(count)
    return BATCH_HEADER_BYTES + varint_size(body) + body


class RecordSizer:
    """`record_size` of the record the relay will send for an event (`Event.to_record()`),
    from the lengths publish() has already measured; the parts every event of one Outbox
    shares (CloudEvents header names, id, time, source, content type) are summed once.

    Exact, or at most 7 bytes over when ce_time has no fraction of a second; never under.
    """

    __slots__ = ("_ce_count", "_fixed")

    def __init__(self, *, source: str, content_type: str) -> None:
        template = kafka_headers(event_id=uuid.UUID(int=0), type="", source=source,
                                 occurred_at=_LONGEST_TIME, content_type=content_type,
                                 headers={})
        self._ce_count = len(template)
        # 3: attributes and the two deltas. The type's value is added per event.
        self._fixed = 3 + sum(_framed(len(n.encode())) + _framed(len(v))
                              for n, v in template) - _framed(0)

    def size(self, *, key: int, value: int, type: int, headers: int, header_count: int) -> int:
        """Lengths in UTF-8 bytes; `headers` is check_headers()'s size of the user's."""
        body = (self._fixed + varint_size(key) + key + varint_size(value) + value
                + varint_size(type) + type + headers + varint_size(self._ce_count + header_count))
        return BATCH_HEADER_BYTES + varint_size(body) + body


def _framed(n: int) -> int:
    return varint_size(n) + n


@dataclass(frozen=True, slots=True)
class Event:
    """One event: what service code publishes and what a consumer's handler receives.

    `data` is the serialized payload (what goes on the wire); `payload` is the Python
    value it came from, or that a consumer decoded from it.
    """

    topic: str
    key: str
    type: str
    payload: Any
    data: bytes
    content_type: str = "application/json"
    source: str = DEFAULT_SOURCE
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    id: uuid.UUID = field(default_factory=uuid7)
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def kafka_headers(self) -> KafkaHeaders:
        return kafka_headers(
            event_id=self.id,
            type=self.type,
            source=self.source,
            occurred_at=self.occurred_at,
            content_type=self.content_type,
            headers=self.headers,
        )

    def to_record(self) -> tuple[bytes, bytes, KafkaHeaders]:
        """(key, value, headers) of the Kafka record for this event."""
        return self.key.encode(), self.data, self.kafka_headers()


def kafka_headers(
    *,
    event_id: uuid.UUID,
    type: str,
    source: str,
    occurred_at: datetime,
    content_type: str,
    headers: Mapping[str, HeaderValue],
) -> KafkaHeaders:
    """CloudEvents binary-mode headers, then the user's own."""
    out: KafkaHeaders = [
        (SPEC_HEADER, SPEC_VALUE),
        ("ce_id", str(event_id).encode()),
        ("ce_type", type.encode()),
        ("ce_source", source.encode()),
        ("ce_time", format_time(occurred_at).encode()),
        ("content-type", content_type.encode()),
    ]
    for name, value in headers.items():
        out.append((name, value if isinstance(value, bytes) else value.encode()))
    return out


def stored_to_kafka_headers(stored: Mapping[str, Any]) -> KafkaHeaders:
    """User headers as the outbox table stores them (JSON: str as is, bytes as
    {"b": hex}; see serde.encode_headers) to Kafka's (name, bytes) pairs."""
    return [(n, bytes.fromhex(v["b"]) if isinstance(v, dict) else v.encode())
            for n, v in stored.items()]


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a `Z`, as CloudEvents wants. The relay has
    PostgreSQL format it the same way (store.CE_TIME_SQL); a test keeps them equal."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def from_record(
    *,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes]],
    decode: Any,
    id_header: str = ID_HEADER,
) -> Event:
    """Turn a Kafka record back into an Event; `decode(content_type, data)` gives the payload.

    Raises MalformedRecord (naming what is wrong) for records that carry no usable id or
    whose payload cannot be decoded, so a consumer can dead-letter them.
    """
    hdrs: dict[str, bytes] = dict(headers)
    if None in hdrs.values():  # kafka-python gives a header without a value as None
        hdrs = {name: raw if raw is not None else b"" for name, raw in hdrs.items()}
    raw_id = hdrs.get(id_header)
    if not raw_id:
        raise MalformedRecord(f"record has no {id_header!r} header to take the event id from")
    try:
        text_id = raw_id.decode().strip().strip('"')
        event_id = uuid.UUID(text_id)
    except ValueError:
        # Foreign producers (e.g. Debezium's `id`) may use ids that are not UUIDs:
        # derive a stable UUID from the text so deduplication still works.
        event_id = uuid.uuid5(uuid.NAMESPACE_URL, raw_id.decode(errors="replace"))
    raw_type = hdrs.get("content-type")
    content_type = "application/json" if raw_type is None else raw_type.decode(
        errors="replace")
    data = value if value is not None else b""
    try:
        payload = decode(content_type, data)
    except Exception as exc:
        raise MalformedRecord(f"payload cannot be decoded as {content_type}: {exc}") from exc
    raw_time = hdrs.get("ce_time")
    try:
        occurred_at = parse_time(raw_time.decode()) if raw_time is not None else None
    except ValueError as exc:
        raise MalformedRecord(f"ce_time header is not an RFC 3339 time: {exc}") from exc
    user_headers: dict[str, HeaderValue] = {} if hdrs.keys() <= _RESERVED_HEADERS else {
        name: raw for name, raw in hdrs.items() if name not in _RESERVED_HEADERS
    }
    return Event(
        topic=topic,
        key=key.decode(errors="replace") if key is not None else "",
        type=hdrs.get("ce_type", b"").decode(errors="replace"),
        payload=payload,
        data=data,
        content_type=content_type,
        source=hdrs.get("ce_source", b"").decode(errors="replace"),
        headers=user_headers,
        id=event_id,
        occurred_at=occurred_at or datetime.now(UTC),
    )
