"""Kafka in memory, for unit tests: the real consumer loop runs on it without servers.

    broker = InMemoryBroker()
    broker.create_topic("orders", partitions=3)
    broker.produce_event(event)
    runner = ConsumerRunner(Projector(), db_url="sqlite:///t.db",
                            source=broker.source("projector"), dead_letters=broker.publisher())
    runner.run_once()
    broker.committed("projector")           # {TopicPartition("orders", 0): 1, ...}
    broker.records("orders.dlq")            # what was dead-lettered

Like procrastinate's InMemoryConnector or dramatiq's StubBroker: records per partition
with offsets, consumer groups with committed offsets, eager rebalances delivered inside
`poll` (revoked, then assigned, as kafka-python does), pause/resume and seek, and knobs
to script what real brokers do now and then: a rebalance (`rebalance`), refused or
failed commits (`fail_commits`), an outage (`down`), a topic's size limit.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from outbox.consumer.source import (
    Batch,
    CommitFailed,
    CommitRefused,
    Headers,
    RebalanceListener,
    Record,
    SourceRecord,
    SourceUnavailable,
    TopicPartition,
)
from outbox.event import Event
from outbox.publisher import Delivery
from outbox.serde import JsonSerializer, Serializer


class RecordTooLarge(Exception):
    """The topic's `max_message_bytes` refuses the record (as MessageSizeTooLargeError)."""

    too_large = True


class BrokerDown(Exception):
    """The in-memory broker is `down`."""


class InMemoryBroker:
    """Topics, partitions and consumer groups in memory; thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._logs: dict[str, list[list[SourceRecord]]] = {}
        self._limits: dict[str, int] = {}
        self._committed: dict[str, dict[TopicPartition, int]] = {}
        self._members: dict[str, list[InMemorySource]] = {}
        self._generation: dict[str, int] = {}
        self._commit_failures: dict[str, list[BaseException]] = {}
        self._down = False

    # -- topics and records -----------------------------------------------------------

    @property
    def down(self) -> bool:
        """While True, polls, subscriptions and sends fail as with a broker unreachable."""
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        with self._cond:
            self._down = value
            self._cond.notify_all()

    def create_topic(self, name: str, partitions: int = 1,
                     max_message_bytes: int | None = None) -> None:
        with self._cond:
            if name not in self._logs:
                self._logs[name] = [[] for _ in range(partitions)]
            if max_message_bytes is not None:
                self._limits[name] = max_message_bytes
            for group, members in self._members.items():
                if any(name in m.topics for m in members):
                    self._rebalance(group, None)

    def produce(self, topic: str, value: bytes | None, key: bytes | None = None,
                headers: Headers = (), partition: int | None = None) -> SourceRecord:
        """Append a record (the topic is made with one partition if new); the partition
        is the given one, else the key's hash, as Kafka's partitioner does it."""
        with self._cond:
            if topic not in self._logs:
                self.create_topic(topic)
            if self._down:
                raise BrokerDown("the in-memory broker is down")
            log = self._logs[topic]
            if partition is None:
                partition = zlib.crc32(key) % len(log) if key is not None else 0
            record = SourceRecord(topic, partition, len(log[partition]), key, value,
                                  tuple(headers))
            limit = self._limits.get(topic)
            if limit is not None and record.size > limit:
                raise RecordTooLarge(f"{record.size} bytes is more than {topic}'s "
                                     f"max.message.bytes ({limit})")
            log[partition].append(record)
            self._cond.notify_all()
            return record

    def produce_event(self, event: Event, partition: int | None = None) -> SourceRecord:
        key, value, headers = event.to_record()
        return self.produce(event.topic, value, key, headers, partition)

    def publish(self, topic: str, *, key: str, type: str, payload: Any,
                serializer: Serializer | None = None, partition: int | None = None) -> Event:
        """Produce the record the relay would send for this event (JSON by default)."""
        ser = serializer or JsonSerializer()
        event = Event(topic=topic, key=key, type=type, payload=payload,
                      data=ser.dumps(payload), content_type=ser.content_type)
        self.produce_event(event, partition)
        return event

    def records(self, topic: str) -> list[SourceRecord]:
        """Every record of a topic, by partition then offset."""
        with self._cond:
            return [r for part in self._logs.get(topic, []) for r in part]

    def partitions(self, topic: str) -> list[TopicPartition]:
        with self._cond:
            return [TopicPartition(topic, p) for p in range(len(self._logs.get(topic, [])))]

    def end_offset(self, tp: TopicPartition) -> int:
        with self._cond:
            return len(self._logs[tp.topic][tp.partition])

    # -- groups -----------------------------------------------------------------------

    def source(self, group_id: str) -> InMemorySource:
        """A new member of `group_id`; it joins the group when it subscribes."""
        return InMemorySource(self, group_id)

    def publisher(self, fail: Callable[[SourceRecord], BaseException | None] | None = None
                  ) -> BrokerPublisher:
        """A Publisher that produces to this broker (for dead-letter copies)."""
        return BrokerPublisher(self, fail)

    def committed(self, group_id: str) -> dict[TopicPartition, int]:
        with self._cond:
            return dict(self._committed.get(group_id, {}))

    def members(self, group_id: str) -> list[InMemorySource]:
        with self._cond:
            return list(self._members.get(group_id, []))

    def fail_commits(self, group_id: str, *errors: BaseException) -> None:
        """The group's next commits raise these, one each (CommitRefused, CommitFailed)."""
        with self._cond:
            self._commit_failures.setdefault(group_id, []).extend(errors)

    def rebalance(self, group_id: str,
                  assignment: Mapping[InMemorySource, Sequence[TopicPartition]] | None = None
                  ) -> None:
        """A new generation of the group: each member hears, at its next poll, that all
        its partitions were revoked and which ones it is assigned (`assignment`, or the
        partitions dealt round-robin). Commits of the old generation are refused."""
        with self._cond:
            self._rebalance(group_id, assignment)

    def _rebalance(self, group: str,
                   assignment: Mapping[InMemorySource, Sequence[TopicPartition]] | None) -> None:
        members = self._members.get(group, [])
        self._generation[group] = self._generation.get(group, 0) + 1
        if assignment is None:
            topics = sorted({t for m in members for t in m.topics})
            every = [TopicPartition(t, p) for t in topics
                     for p in range(len(self._logs.get(t, [])))]
            assignment = {m: every[i::len(members)] for i, m in enumerate(members)}
        for member in members:
            member._queue_rebalance(self._generation[group], list(assignment.get(member, ())))
        self._cond.notify_all()

    def _join(self, member: InMemorySource) -> None:
        with self._cond:
            if self._down:
                raise SourceUnavailable("Kafka unavailable (the in-memory broker is down)")
            for topic in member.topics:
                if topic not in self._logs:
                    self._logs[topic] = [[]]
            self._members.setdefault(member.group_id, []).append(member)
            self._rebalance(member.group_id, None)

    def _leave(self, member: InMemorySource) -> None:
        with self._cond:
            members = self._members.get(member.group_id, [])
            if member in members:
                members.remove(member)
                self._rebalance(member.group_id, None)

    def _commit(self, member: InMemorySource, offsets: Mapping[TopicPartition, int]) -> None:
        with self._cond:
            group = member.group_id
            failures = self._commit_failures.get(group)
            if failures:
                raise failures.pop(0)
            if self._down:
                raise CommitFailed("Kafka unavailable (the in-memory broker is down)")
            if member.generation != self._generation.get(group) or \
                    not set(offsets) <= set(member._positions):
                raise CommitRefused("the group rebalanced: this member's generation is over")
            self._committed.setdefault(group, {}).update(offsets)


class InMemorySource:
    """One consumer group member on an InMemoryBroker: a RecordSource."""

    def __init__(self, broker: InMemoryBroker, group_id: str) -> None:
        self.broker = broker
        self.group_id = group_id
        self.topics: list[str] = []
        self.generation = 0
        self.closed = False
        self.paused: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._listener: RebalanceListener | None = None
        self._pending: list[tuple[int, list[TopicPartition]]] = []

    def __repr__(self) -> str:
        return f"<InMemorySource {self.group_id} {id(self):#x}>"

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self.topics = list(topics)
        self._listener = listener
        self.broker._join(self)
        self.closed = False

    def _queue_rebalance(self, generation: int, partitions: list[TopicPartition]) -> None:
        self._pending.append((generation, partitions))

    def _deliver_rebalances(self) -> None:
        """Revoked, then assigned: inside poll, as the real clients do."""
        while True:
            with self.broker._cond:
                if not self._pending:
                    return
                generation, assigned = self._pending.pop(0)
                revoked = sorted(self._positions)
                committed = self.broker._committed.get(self.group_id, {})
                self._positions = {tp: committed.get(tp, 0) for tp in assigned}
                self.paused.clear()
                self.generation = generation
            if self._listener is not None:
                if revoked:
                    self._listener.revoked(revoked)
                self._listener.assigned(sorted(assigned))

    def poll(self, timeout: float, max_records: int) -> Batch:
        if self.closed:
            raise RuntimeError("the in-memory source is closed")
        if self.broker.down:
            raise SourceUnavailable("Kafka unavailable (the in-memory broker is down)")
        self._deliver_rebalances()
        batch = self._take(max_records)
        if not batch and timeout > 0:
            with self.broker._cond:
                self.broker._cond.wait(timeout)
            self._deliver_rebalances()
            batch = self._take(max_records)
        return batch

    def _take(self, max_records: int) -> dict[TopicPartition, list[Record]]:
        out: dict[TopicPartition, list[Record]] = {}
        left = max_records
        with self.broker._cond:
            for tp in sorted(self._positions):
                if tp in self.paused or not left:
                    continue
                log = self.broker._logs[tp.topic][tp.partition]
                start = self._positions[tp]
                taken: list[Record] = list(log[start:start + left])
                if taken:
                    out[tp] = taken
                    self._positions[tp] = start + len(taken)
                    left -= len(taken)
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        with self.broker._cond:
            if tp in self._positions:
                self._positions[tp] = offset

    def position(self, tp: TopicPartition) -> int | None:
        return self._positions.get(tp)

    def pause(self, tp: TopicPartition) -> None:
        if tp in self._positions:
            self.paused.add(tp)

    def resume(self, tp: TopicPartition) -> None:
        self.paused.discard(tp)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.broker._commit(self, offsets)

    def assignment(self) -> set[TopicPartition]:
        return set(self._positions)

    def lag(self) -> dict[TopicPartition, int]:
        return {tp: self.broker.end_offset(tp) - pos for tp, pos in self._positions.items()}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.broker._leave(self)
            self._positions.clear()


class _Sent:
    __slots__ = ("_error",)

    def __init__(self, error: BaseException | None) -> None:
        self._error = error

    def done(self) -> bool:
        return True

    def error(self) -> BaseException | None:
        return self._error


class BrokerPublisher:
    """A Publisher into an InMemoryBroker; `fail(record)` may script a failure."""

    def __init__(self, broker: InMemoryBroker,
                 fail: Callable[[SourceRecord], BaseException | None] | None = None) -> None:
        self.broker = broker
        self.fail = fail
        self.recovered = 0
        self.closed = False

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: Any) -> Delivery:
        record = SourceRecord(topic, -1, -1, key, value, tuple(headers))
        error = self.fail(record) if self.fail is not None else None
        if error is None:
            try:
                self.broker.produce(topic, value, key, headers)
            except (BrokerDown, RecordTooLarge) as exc:
                error = exc
        return _Sent(error)

    def flush(self, timeout: float) -> None:
        return None

    def recover(self) -> None:
        self.recovered += 1

    def close(self, timeout: float = 5.0) -> None:
        self.closed = True


__all__ = ["BrokerDown", "BrokerPublisher", "InMemoryBroker", "InMemorySource",
           "RecordTooLarge"]
