"""The envelope, UUIDv7 and the CloudEvents Kafka mapping."""

import uuid
from datetime import UTC, datetime

import pytest

from outbox import Event, InvalidHeader, InvalidKey, InvalidTopic, MalformedRecord, uuid7
from outbox.event import from_record, validate_topic
from outbox.serde import decode


def test_uuid7_is_version_7_and_time_ordered() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert ids == sorted(ids, key=lambda u: u.bytes)
    assert len(set(ids)) == len(ids)
    ms = ids[0].int >> 80
    assert abs(ms - datetime.now(UTC).timestamp() * 1000) < 5000


def test_event_round_trips_through_a_kafka_record() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    e = Event(topic="orders", key="42", type="OrderPlaced", payload={"id": 42},
              data=b'{"id":42}', source="shop", headers={"tenant": "a", "raw": b"\x00\x01"},
              occurred_at=when)
    key, value, headers = e.to_record()
    assert key == b"42" and value == b'{"id":42}'
    names = [h for h, _ in headers]
    assert names[:6] == ["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time",
                         "content-type"]
    assert dict(headers)["ce_time"] == b"2026-01-02T03:04:05.678000Z"
    back = from_record(topic="orders", key=key, value=value, headers=headers, decode=decode)
    assert back == Event(topic="orders", key="42", type="OrderPlaced", payload={"id": 42},
                         data=b'{"id":42}', source="shop",
                         headers={"tenant": b"a", "raw": b"\x00\x01"}, id=e.id,
                         occurred_at=when)


def test_record_without_id_is_malformed() -> None:
    with pytest.raises(MalformedRecord, match="no 'ce_id' header"):
        from_record(topic="t", key=b"k", value=b"{}", headers=[], decode=decode)


def test_record_with_undecodable_json_is_malformed() -> None:
    hdrs = [("ce_id", str(uuid7()).encode())]
    with pytest.raises(MalformedRecord, match="cannot be decoded as application/json"):
        from_record(topic="t", key=b"k", value=b"not json", headers=hdrs, decode=decode)


def test_a_header_without_a_value_reads_as_empty_bytes() -> None:
    """kafka-python hands a header sent without a value as None."""
    eid = uuid7()
    hdrs = [("ce_id", str(eid).encode()), ("trace", None), ("tenant", b"a")]
    e = from_record(topic="t", key=b"k", value=b"{}", headers=hdrs,  # type: ignore[list-item]
                    decode=decode)
    assert e.id == eid and e.headers == {"trace": b"", "tenant": b"a"}


@pytest.mark.parametrize(("content_type", "data", "payload"), [
    ("application/json", b'{"a":1}', {"a": 1}),
    ("Application/JSON; charset=utf-8", b'{"a":1}', {"a": 1}),
    ("application/cloudevents+json", b"[1]", [1]),
    ("text/plain", b"hi", b"hi"),
    ("text/plain", b"again", b"again"),  # the remembered answer, asked again
    ("application/json", b'"\\u00fc"', "\u00fc"),  # a JSON escape
    # not plain UTF-8: json.loads guesses the encoding, as it always did
    ("application/json", '{"a": "\u00fc"}'.encode("utf-16"), {"a": "\u00fc"}),
    ("application/json", '{"a": 1}'.encode("utf-16-le"), {"a": 1}),  # no BOM: valid UTF-8
    ("application/json", '{"a": 1}'.encode("utf-16-be"), {"a": 1}),
    ("application/json", "[1]".encode("utf-32-le"), [1]),
    ("application/json", b'\xef\xbb\xbf{"a":1}', {"a": 1}),  # UTF-8 with a BOM
])
def test_decode_by_content_type(content_type: str, data: bytes, payload: object) -> None:
    assert decode(content_type, data) == payload


def test_bad_json_still_raises() -> None:
    with pytest.raises(ValueError):
        decode("application/json", b'{"a": ')


def test_foreign_id_header_gives_a_stable_uuid() -> None:
    hdrs = [("id", b"dbz-123")]
    a = from_record(topic="t", key=None, value=b"{}", headers=hdrs, decode=decode, id_header="id")
    b = from_record(topic="t", key=None, value=b"{}", headers=hdrs, decode=decode, id_header="id")
    assert a.id == b.id


@pytest.mark.parametrize("bad", ["", ".", "..", "a b", "x" * 250, "ümlaut", "a/b",
                                 "orders\n", "\norders", "orders\r\n", "x" * 249 + "\n"])
def test_invalid_topics_are_refused(bad: str) -> None:
    """Kafka refuses these names, so the relay could never send the event: `$` must not
    let a trailing newline through."""
    with pytest.raises(InvalidTopic, match="invalid Kafka topic name"):
        validate_topic(bad)


@pytest.mark.parametrize("internal", ["__consumer_offsets", "__transaction_state",
                                      "__cluster_metadata", "__share_group_state"])
def test_internal_topics_are_refused(internal: str) -> None:
    """The broker refuses appends to its internal topics."""
    with pytest.raises(InvalidTopic, match="internal topic"):
        validate_topic(internal)


def test_valid_topic() -> None:
    assert validate_topic("orders.v1_x-y") == "orders.v1_x-y"
    assert validate_topic("x" * 249) == "x" * 249
    assert validate_topic("__private") == "__private"


def test_key_and_header_errors_name_the_problem() -> None:
    from outbox.event import validate_headers, validate_key

    with pytest.raises(InvalidKey, match="must be a str, got int"):
        validate_key(7)
    with pytest.raises(InvalidHeader, match="'n' has a value of type int"):
        validate_headers({"n": 1})
    with pytest.raises(InvalidHeader, match="set by the outbox itself"):
        validate_headers({"ce_id": "x"})
