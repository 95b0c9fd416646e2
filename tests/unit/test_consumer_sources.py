"""The Kafka clients behind the seam, with fakes: what each is configured with (static
membership, no auto-commit), and how their errors map onto the seam's."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from outbox.consumer import ConsumerConfig, TopicPartition
from outbox.consumer.confluent_source import ConfluentSource
from outbox.consumer.kafka_source import KafkaPythonSource, _listener
from outbox.consumer.source import CommitFailed, CommitRefused, SourceUnavailable


class Notes:
    def assigned(self, partitions: Any) -> None: ...

    def revoked(self, partitions: Any) -> None: ...


def test_kafka_python_gets_static_membership_and_never_auto_commits(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import kafka

    made: dict[str, Any] = {}

    class Fake:
        def __init__(self, **config: Any) -> None:
            made.update(config)

        def subscribe(self, **kw: Any) -> None:
            made["topics"] = kw["topics"]

    monkeypatch.setattr(kafka, "KafkaConsumer", Fake)
    cfg = ConsumerConfig(kafka="a:1,b:2", group_instance_id="pod-1", session_timeout_ms=8000,
                         kafka_config={"security_protocol": "SSL"})
    KafkaPythonSource(cfg, "g").subscribe(["t"], Notes())
    assert made["group_instance_id"] == "pod-1" and made["group_id"] == "g"
    assert made["enable_auto_commit"] is False and made["session_timeout_ms"] == 8000
    assert made["bootstrap_servers"] == ["a:1", "b:2"] and made["topics"] == ["t"]
    assert made["security_protocol"] == "SSL"


def test_confluent_gets_static_membership_and_never_auto_commits() -> None:
    cfg = ConsumerConfig(kafka="a:1", client="confluent", group_instance_id="pod-1",
                         kafka_config={"security.protocol": "SSL",
                                       "enable.auto.commit": "true"})
    settings = ConfluentSource(cfg, "g").settings()
    assert settings["group.instance.id"] == "pod-1" and settings["group.id"] == "g"
    assert settings["enable.auto.commit"] is False
    assert settings["enable.auto.offset.store"] is False
    assert settings["security.protocol"] == "SSL"


class Msg:
    def __init__(self, partition: int, offset: int, error: Any = None) -> None:
        self._p, self._o, self._e = partition, offset, error

    def error(self) -> Any:
        return self._e

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"v"

    def headers(self) -> list[tuple[str, bytes]]:
        return [("ce_id", b"x")]


class FakeConfluent:
    def __init__(self, queue: list[Msg]) -> None:
        self.queue = queue
        self.waited: list[float] = []
        self.commit_error: KafkaException | None = None

    def consume(self, num_messages: int, timeout: float) -> list[Msg]:
        assert timeout == 0, "consume() waits for a full batch: never with a timeout"
        taken, self.queue = self.queue[:num_messages], self.queue[num_messages:]
        return taken

    def poll(self, timeout: float) -> Msg | None:
        self.waited.append(timeout)
        return self.queue.pop(0) if self.queue else None

    def pause(self, partitions: Any) -> None: ...

    def resume(self, partitions: Any) -> None: ...

    def seek(self, partition: Any) -> None: ...

    def commit(self, offsets: Any, asynchronous: bool) -> None:
        if self.commit_error is not None:
            raise self.commit_error


def test_confluent_poll_returns_what_is_there_and_skips_paused_partitions() -> None:
    source = ConfluentSource(ConsumerConfig(kafka="a:1", client="confluent"), "g")
    fake = FakeConfluent([Msg(0, 0), Msg(1, 0), Msg(0, 1)])
    source.client = fake
    source.pause(TopicPartition("t", 1))
    got = source.poll(1.0, max_records=10)
    assert {tp: [r.offset for r in rs] for tp, rs in got.items()} == {
        TopicPartition("t", 0): [0, 1]}
    assert fake.waited == []  # records were there: no waiting
    assert source.poll(0.3, max_records=10) == {} and fake.waited == [0.3]


def test_confluent_errors_map_onto_the_seam() -> None:
    source = ConfluentSource(ConsumerConfig(kafka="a:1", client="confluent"), "g")
    fake = FakeConfluent([])
    source.client = fake
    source._on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "down"))
    with pytest.raises(SourceUnavailable, match="Kafka unavailable"):
        source.poll(0, 10)
    assert source.poll(0, 10) == {}  # reported once
    fake.commit_error = KafkaException(KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
    with pytest.raises(CommitRefused):
        source.commit({TopicPartition("t", 0): 1})
    fake.commit_error = KafkaException(KafkaError(KafkaError._TIMED_OUT))
    with pytest.raises(CommitFailed):
        source.commit({TopicPartition("t", 0): 1})


def test_kafka_python_source_pauses_a_partition_whose_buffer_is_full_until_it_drains(
) -> None:
    """Flow control: the source takes everything kafka-python buffered, so it pauses a
    partition it holds too many records of, and resumes it once the runner caught up."""
    from kafka.structs import TopicPartition as KafkaTP

    class Rec:
        def __init__(self, offset: int) -> None:
            self.topic, self.partition, self.offset = "t", 0, offset

    class Fake:
        def __init__(self) -> None:
            self.calls: list[str] = []
            self.batches = [{KafkaTP("t", 0): [Rec(o) for o in range(30)]}]

        def poll(self, timeout_ms: int, max_records: int) -> Any:
            return self.batches.pop(0) if self.batches else {}

        def pause(self, tp: Any) -> None:
            self.calls.append("pause")

        def resume(self, tp: Any) -> None:
            self.calls.append("resume")

    source = KafkaPythonSource(ConsumerConfig(kafka="k:1", max_poll_records=5), "g")
    source.flow_limit = 20
    source.client = fake = Fake()
    got = source.poll(0, max_records=5)
    assert [r.offset for r in got[TopicPartition("t", 0)]] == [0, 1, 2, 3, 4]
    assert fake.calls == ["pause"]  # 25 left, more than the limit
    offsets: list[int] = []
    while len(offsets) < 25:
        offsets += [r.offset for rs in source.poll(0, 5).values() for r in rs]
    assert offsets == list(range(5, 30)) and fake.calls == ["pause", "resume"]


def test_kafka_python_source_restarts_a_partition_given_back_at_its_commit() -> None:
    """kafka-python keeps a partition's position and pause flag when a rebalance gives it
    back to the same member. The source had buffered (and, at the revocation, dropped)
    records behind that position: it must fetch them again from the committed offset,
    and unpause the partition, or they are never delivered (a group that never commits
    to the end)."""
    from kafka.structs import TopicPartition as KafkaTP

    class Rec:
        def __init__(self, offset: int) -> None:
            self.topic, self.partition, self.offset = "t", 0, offset

    ktp, tp = KafkaTP("t", 0), TopicPartition("t", 0)

    class Fake:
        """Per-partition position and pause flag, kept across a rebalance, as kafka-python
        3.0 does for a partition that stays with its member."""

        def __init__(self) -> None:
            self.position, self.paused, self.end, self.commit = 0, False, 30, 3
            self.rebalance_on_poll: int | None = None
            self.polls = 0

        def poll(self, timeout_ms: int, max_records: int) -> Any:
            self.polls += 1
            if self.polls == self.rebalance_on_poll:  # kafka-python calls these in poll
                kafka_listener.on_partitions_revoked({ktp})
                kafka_listener.on_partitions_assigned({ktp})
            if self.paused or self.position >= self.end:
                return {}
            got = [Rec(o) for o in range(self.position, self.end)]
            self.position = self.end  # kafka-python moves past all it returns
            return {ktp: got}

        def pause(self, p: Any) -> None:
            self.paused = True

        def resume(self, p: Any) -> None:
            self.paused = False

        def committed(self, p: Any, timeout_ms: int | None = None) -> int:
            return self.commit

        def seek(self, p: Any, offset: int) -> None:
            self.position = offset

    class Notes:
        def revoked(self, tps: Any) -> None: ...

        def assigned(self, tps: Any) -> None: ...

    source = KafkaPythonSource(ConsumerConfig(kafka="k:1", max_poll_records=5), "g")
    kafka_listener = _listener(source, Notes())  # type: ignore[arg-type]
    source.flow_limit = 20
    source.client = fake = Fake()
    first = source.poll(0, max_records=5)
    assert [r.offset for r in first[tp]] == [0, 1, 2, 3, 4]
    assert fake.paused  # 25 buffered: paused by flow control
    fake.rebalance_on_poll = fake.polls + 1  # the same partition, revoked and given back
    source._last_client_poll = -10.0  # the client is due a poll (rebalances run in it)
    offsets: list[int] = []
    for _ in range(20):
        offsets += [r.offset for rs in source.poll(0, 5).values() for r in rs]
    assert not fake.paused
    assert offsets == list(range(3, 30))  # from the commit, every record, in order
