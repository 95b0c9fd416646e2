"""The in-memory broker behaves like Kafka where the consumer relies on it: partitions
and offsets, groups with committed offsets, eager rebalances inside poll, pause/seek,
refused commits after a rebalance, size limits and outages."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from outbox.consumer.source import (
    CommitFailed,
    CommitRefused,
    SourceUnavailable,
    TopicPartition,
    is_too_large,
)
from outbox.testing import InMemoryBroker, RecordTooLarge

T0, T1 = TopicPartition("t", 0), TopicPartition("t", 1)


class Listener:
    def __init__(self) -> None:
        self.log: list[tuple[str, list[TopicPartition]]] = []

    def assigned(self, partitions: Sequence[TopicPartition]) -> None:
        self.log.append(("assigned", list(partitions)))

    def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        self.log.append(("revoked", list(partitions)))


def test_records_per_partition_poll_seek_pause_and_commit() -> None:
    broker = InMemoryBroker()
    broker.create_topic("t", partitions=2)
    for i in range(3):
        broker.produce("t", f"v{i}".encode(), partition=0)
    broker.produce("t", b"w", partition=1)
    source, listener = broker.source("g"), Listener()
    source.subscribe(["t"], listener)
    got = source.poll(0, max_records=10)
    assert listener.log == [("assigned", [T0, T1])]  # delivered inside poll
    assert [r.offset for r in got[T0]] == [0, 1, 2] and [r.value for r in got[T1]] == [b"w"]
    assert source.poll(0, 10) == {}
    source.seek(T0, 1)
    source.pause(T0)
    assert source.poll(0, 10) == {}
    source.resume(T0)
    assert [r.offset for r in source.poll(0, 10)[T0]] == [1, 2]
    source.commit({T0: 3})
    assert broker.committed("g") == {T0: 3}
    assert source.lag() == {T0: 0, T1: 0}


def test_a_second_member_triggers_an_eager_rebalance_and_old_commits_are_refused() -> None:
    broker = InMemoryBroker()
    broker.create_topic("t", partitions=2)
    a, b = broker.source("g"), broker.source("g")
    la, lb = Listener(), Listener()
    a.subscribe(["t"], la)
    a.poll(0, 10)
    b.subscribe(["t"], lb)
    with pytest.raises(CommitRefused):  # a's generation is over until it polls
        a.commit({T0: 0})
    a.poll(0, 10)
    b.poll(0, 10)
    assert la.log == [("assigned", [T0, T1]), ("revoked", [T0, T1]), ("assigned", [T0])]
    assert lb.log == [("assigned", [T1])]
    with pytest.raises(CommitRefused):  # not a's partition any more
        a.commit({T1: 0})
    broker.produce("t", b"x", partition=1)
    assert list(b.poll(0, 10)) == [T1]
    b.close()  # leaves: a gets everything back, from the committed offsets
    a.poll(0, 10)
    assert la.log[-1] == ("assigned", [T0, T1])


def test_scripted_rebalance_commit_failures_size_limits_and_outages() -> None:
    broker = InMemoryBroker()
    broker.create_topic("t", partitions=2)
    broker.create_topic("t.dlq", max_message_bytes=10)
    a, la = broker.source("g"), Listener()
    a.subscribe(["t"], la)
    a.poll(0, 10)
    broker.rebalance("g", {a: [T1]})
    a.poll(0, 10)
    assert la.log[-2:] == [("revoked", [T0, T1]), ("assigned", [T1])]
    broker.fail_commits("g", CommitFailed("timeout"))
    with pytest.raises(CommitFailed):
        a.commit({T1: 0})
    a.commit({T1: 0})  # only the next one
    with pytest.raises(RecordTooLarge) as raised:
        broker.produce("t.dlq", b"x" * 11)
    assert is_too_large(raised.value)
    sent = broker.publisher().send("t.dlq", b"k", b"x" * 11, [])
    assert sent.done() and is_too_large(sent.error())  # type: ignore[arg-type]
    broker.down = True
    with pytest.raises(SourceUnavailable):
        a.poll(0, 10)
    assert broker.publisher().send("t", b"k", b"v", []).error() is not None
    broker.down = False
    assert a.poll(0, 10) == {}
