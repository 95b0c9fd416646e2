"""`outbox status` on in-memory sources: the JSON schema, the text, the rates and the
--watch frame."""

from __future__ import annotations

import io
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner

from outbox.cli import main
from outbox.consumer.source import TopicPartition
from outbox.status import (
    Held,
    Rates,
    RelayInfo,
    ShardBacklog,
    StaticOffsets,
    StaticOutbox,
    Status,
    as_json,
    gather,
    text_lines,
)

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
HELD_ID = "6f1c1b9e-3a55-4a7e-9d8e-1f0c2b3a4d5e"
OTHER_ID = "0b7f3a52-9c1d-4e0a-8a5b-2c3d4e5f6a7b"
P0, P1 = TopicPartition("orders", 0), TopicPartition("orders", 1)


def outbox(**kw: Any) -> StaticOutbox:
    base: dict[str, Any] = {
        "taken_at": T0, "count": 4, "dead": 2, "drawn": 1000,
        "shards": [ShardBacklog(0, 3, 12.5, 0), ShardBacklog(2, 1, 1.0, 4),
                   ShardBacklog(7, 1, 30.0, 0)],
        "live_relays": [RelayInfo("relay-a", 101, "10.0.0.5", (0, 1)),
                        RelayInfo("relay-b", 102, None, (3,))],
        "retries": {"projector": (1, 3)},
        "attempts": {("projector", HELD_ID): Held(HELD_ID, 3, "ValueError: bad\nmore")},
    }
    base.update(kw)
    return StaticOutbox(**base)


def offsets(**kw: Any) -> StaticOffsets:
    base: dict[str, Any] = {
        "commits": {"projector": {P0: 40, P1: 7}, "billing": {P0: 50}},
        "ends": {P0: 50, P1: 7},
        "topic_records": {"orders.dlq": 5},
        "ids": {(P0, 40): HELD_ID, (P1, 7): OTHER_ID},
    }
    base.update(kw)
    return StaticOffsets(**base)


# The documented schema (outbox/status.py): key -> type(s); a list of dicts -> [schema].
PARTITION = {"topic": str, "partition": int, "committed": int, "end": int, "lag": int,
             "held": (dict, type(None))}
SCHEMA: dict[str, Any] = {
    "version": int, "taken_at": str, "pending": int,
    "oldest_pending_seconds": (float, type(None)), "dead_letters": int, "shard_count": int,
    "positions_drawn": (int, type(None)),
    "shards": [{"shard": int, "pending": int, "oldest_pending_seconds": float,
                "max_attempts": int, "owner": (str, type(None)),
                "outside_shard_count": bool}],
    "relays": [{"name": str, "pid": int, "addr": (str, type(None)), "shards": list}],
    "consumer_groups": [{"group": str, "lag": (int, type(None)), "retrying_events": int,
                         "max_attempts": int, "partitions": [PARTITION],
                         "dead_letter_topics": (dict, type(None)),
                         "error": (str, type(None))}],
    "errors": list,
}
HELD = {"event_id": str, "attempts": int, "last_error": (str, type(None))}


def conforms(doc: dict[str, Any], schema: dict[str, Any], where: str = "") -> list[str]:
    """Every difference between `doc` and `schema`: keys missing or extra, wrong types."""
    wrong = [f"{where}keys {sorted(set(doc) ^ set(schema))}"] if set(doc) != set(schema) else []
    for key, kind in schema.items():
        value = doc.get(key)
        if isinstance(kind, list):
            if not isinstance(value, list):
                wrong.append(f"{where}{key}: not a list")
                continue
            for i, item in enumerate(value):
                wrong += conforms(item, kind[0], f"{where}{key}[{i}].")
        elif key in doc and ((isinstance(value, bool) and kind is not bool)
                             or not isinstance(value, kind)):
            wrong.append(f"{where}{key}: {type(value).__name__}")
    return wrong


def test_json_follows_the_documented_schema_and_says_what_it_found() -> None:
    status = gather(outbox(), offsets(), groups=["billing"])
    doc = json.loads(json.dumps(as_json(status)))
    assert conforms(doc, SCHEMA) == []
    held = [p["held"] for g in doc["consumer_groups"] for p in g["partitions"] if p["held"]]
    assert held and all(conforms(h, HELD) == [] for h in held)

    assert doc["version"] == 1 and doc["taken_at"] == "2025-01-02T03:04:05+00:00"
    assert (doc["pending"], doc["oldest_pending_seconds"], doc["dead_letters"]) == (5, 30.0, 2)
    assert [(s["shard"], s["owner"], s["outside_shard_count"]) for s in doc["shards"]] == [
        (0, "relay-a", False), (2, None, False), (7, None, True)]
    assert doc["relays"][0] == {"name": "relay-a", "pid": 101, "addr": "10.0.0.5",
                                "shards": [0, 1]}
    # --group first, then every group with events in retry
    billing, projector = doc["consumer_groups"]
    assert billing["group"] == "billing" and billing["lag"] == 0
    assert billing["retrying_events"] == 0 and billing["partitions"][0]["held"] is None
    assert projector["lag"] == 10 and projector["retrying_events"] == 1
    assert projector["partitions"][0] == {
        "topic": "orders", "partition": 0, "committed": 40, "end": 50, "lag": 10,
        "held": {"event_id": HELD_ID, "attempts": 3, "last_error": "ValueError: bad\nmore"}}
    assert projector["partitions"][1]["held"] is None  # caught up: nothing to hold
    assert projector["dead_letter_topics"] == {"orders.dlq": 5}
    assert doc["errors"] == []
    # the check itself notices a change of type, a lost key and a bool for an int
    broken = {**doc, "pending": "5", "shards": [{**doc["shards"][0], "shard": True}]}
    del broken["errors"]
    assert conforms(broken, SCHEMA) == ["keys ['errors']", "pending: str",
                                        "shards[0].shard: bool"]


def test_an_empty_outbox_has_nulls_where_nothing_is_known() -> None:
    status = gather(StaticOutbox(taken_at=T0, drawn=None))
    doc = as_json(status)
    assert conforms(doc, SCHEMA) == []
    assert doc["oldest_pending_seconds"] is None and doc["positions_drawn"] is None
    assert doc["consumer_groups"] == [] and doc["shards"] == []


def test_without_kafka_the_groups_in_retry_are_listed_without_lag() -> None:
    doc = as_json(gather(outbox(), None))
    [group] = doc["consumer_groups"]
    assert group["lag"] is None and group["partitions"] == []
    assert group["dead_letter_topics"] is None and doc["errors"] == []


def test_kafka_down_is_reported_per_group_and_as_an_error() -> None:
    status = gather(outbox(), offsets(down="KafkaTimeoutError: Unable to bootstrap"),
                    groups=["billing"])
    doc = as_json(status)
    assert conforms(doc, SCHEMA) == []
    assert [g["error"] for g in doc["consumer_groups"]] == [
        "Kafka: KafkaTimeoutError: Unable to bootstrap"] * 2
    assert doc["errors"] == [
        "consumer group billing: Kafka: KafkaTimeoutError: Unable to bootstrap",
        "consumer group projector: Kafka: KafkaTimeoutError: Unable to bootstrap"]


def test_a_record_that_is_not_an_outbox_event_is_not_held() -> None:
    status = gather(outbox(), offsets(ids={(P0, 40): "not-a-uuid"}))
    assert [p.held for p in status.groups[0].partitions or ()] == [None, None]


def test_text_keeps_the_lines_scripts_and_people_know() -> None:
    lines = text_lines(gather(outbox(), offsets()))
    assert lines[0] == ("pending events: 5   oldest pending: 30.0s   dead letters: 2   "
                        "shards: 4")
    assert "  shard    2: 1 pending, oldest 1.0s, max attempts 4   <- NO OWNER" in lines
    assert any("shard    7" in line and "OUTSIDE THE SHARD COUNT" in line for line in lines)
    assert "warning: pending events in 2 shard(s) no live relay owns: 2,7" in lines
    assert "live relays: 2" in lines and "  relay-b (pid 102, local): shards 3" in lines
    assert ("  projector: lag 10 over 2 partition(s); 1 event(s) in retry (most attempts 3); "
            "dead letters: orders.dlq 5") in lines
    assert any(line.startswith("    orders[0]: committed 40, end 50, lag 10   <- HELD on "
                               f"event {HELD_ID} (3 attempts: ValueError: bad)")
               for line in lines)


def sample(at: float, pending: int, drawn: int | None, dead: int = 0) -> Status:
    return Status(taken_at=T0 + timedelta(seconds=at), shard_count=1,
                  shards=[ShardBacklog(0, pending, 1.0, 0)] if pending else [],
                  dead_letters=dead, relays=[], positions_drawn=drawn)


def test_rates_derive_published_from_positions_backlog_and_dead_letters() -> None:
    rates = Rates.between(sample(0, 100, 1000), sample(2, 60, 1100, dead=2))
    assert rates == Rates(seconds=2.0, backlog=-20.0, written=50.0, published=69.0)
    # dead letters retried: drawn again and pending again, nothing published
    assert Rates.between(sample(0, 0, 1000, dead=5), sample(1, 5, 1005)) == Rates(
        1.0, 5.0, 5.0, 0.0)
    # no right to read the sequence: only the backlog's change
    assert Rates.between(sample(0, 10, None), sample(5, 0, None)) == Rates(
        5.0, -2.0, None, None)
    assert Rates.between(sample(1, 1, 1), sample(1, 1, 1)) is None


def render(renderable: Any, width: int = 160) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


def test_watch_frame_shows_backlog_rates_relays_and_groups() -> None:
    from outbox.status_view import RATE_LABEL, frame

    before = gather(outbox(taken_at=T0 - timedelta(seconds=4), drawn=800), offsets())
    now = gather(outbox(), offsets())
    text = render(frame(now, before, interval=2))
    assert "pending 5   oldest pending 30.0s   dead letters 2   shards 4   live relays 2" in text
    assert "written 50.0/s   published ~50.0/s   backlog change +0.0/s   (over 4.0 s)" in text
    assert RATE_LABEL[:60] in " ".join(text.split())
    rows = {line.split("│")[1].strip(): line for line in text.splitlines()
            if line.count("│") > 4 and line.split("│")[1].strip().isdigit()}
    assert "relay-a" in rows["0"] and "NO OWNER" in rows["2"]
    assert "OUTSIDE THE SHARD COUNT" in rows["7"]
    assert "10.0.0.5" in text and "relay-b" in text
    held_row = next(line for line in text.splitlines() if "orders[0]" in line)
    assert "40" in held_row and "50" in held_row and HELD_ID in held_row
    assert "(3 attempts)" in held_row
    group_row = next(line for line in text.splitlines() if "projector" in line)
    assert "1 (max 3 attempts)" in group_row and "orders.dlq 5" in group_row


def test_first_frame_waits_for_a_second_sample_for_rates() -> None:
    from outbox.status_view import frame

    text = render(frame(gather(outbox()), None))
    assert "rates: after the next sample" in text and "published ~" not in text


def test_watch_redraws_shows_a_failed_sample_and_ends_quietly_on_ctrl_c() -> None:
    from rich.console import Console

    from outbox.status_view import StatusUnavailable, watch

    samples = iter([gather(outbox(taken_at=T0, drawn=900)), None,
                    gather(outbox(taken_at=T0 + timedelta(seconds=2), drawn=1000))])
    sleeps: list[float] = []

    def take() -> Status:
        got = next(samples)
        if got is None:
            raise StatusUnavailable("cannot read postgresql://u:***@db/x: connection refused")
        return got

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    out = io.StringIO()
    watch(take, 1.5, sleep=sleep,
          console=Console(file=out, width=160, color_system=None, force_terminal=True))
    assert sleeps == [1.5, 1.5, 1.5]
    text = out.getvalue()
    assert "not updated: cannot read postgresql://u:***@db/x" in text
    assert "written 50.0/s" in text  # the third frame, against the first


def test_watch_without_rich_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)  # `import rich` raises ImportError
    out = CliRunner().invoke(main, ["status", "--watch", "--db",
                                    "postgresql://u:p@127.0.0.1:1/x"])
    assert out.exit_code == 1
    assert "--watch needs rich: pip install 'transactional-outbox[status]'" in out.output
    assert "Traceback" not in out.output


@pytest.mark.parametrize(("args", "message"), [
    (["--json", "--watch"], "--json and --watch do not go together"),
    (["--group", "projector"], "--group needs --kafka"),
])
def test_status_usage_errors_come_before_any_connection(args: list[str], message: str) -> None:
    out = CliRunner().invoke(main, ["status", "--db", "postgresql://u:p@127.0.0.1:1/x", *args],
                             env={"OUTBOX_KAFKA_BOOTSTRAP_SERVERS": ""})
    assert out.exit_code == 2 and message in out.output


def test_kafka_reader_says_when_kafka_does_not_answer() -> None:
    from outbox.kafka_lag import KafkaGroupOffsets
    from outbox.status import OffsetsUnavailable

    for bootstrap, reason in (("127.0.0.1:1", "Unable to bootstrap"),
                              ("host:notaport", "bad bootstrap servers 'host:notaport'")):
        reader = KafkaGroupOffsets(bootstrap, timeout=1)
        try:
            with pytest.raises(OffsetsUnavailable, match=reason):
                reader.committed("any")
        finally:
            reader.close()
