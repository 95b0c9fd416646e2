"""The transport seam: where the consumer's records come from.

The runner never talks to a Kafka client directly. It talks to a `RecordSource`:

    poll(timeout, max_records) -> {partition: [records in offset order]}
    seek / pause / resume       one partition at a time (holds and rewinds)
    commit({partition: next})   raises CommitRefused (after a rebalance) or CommitFailed
    subscribe(topics, listener) the listener hears of assignments and revocations
    assignment(), lag(), close()

Implementations: kafka-python (`outbox.consumer.kafka_source`, the default), confluent-kafka
(`outbox.consumer.confluent_source`, the `[confluent]` extra) and an in-memory broker for
tests (`outbox.testing.InMemoryBroker`), on which the real loop runs without servers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

Headers = Sequence[tuple[str, bytes | None]]

#: The Kafka clients `outbox consume --client` knows.
CLIENTS = ("kafka-python", "confluent")


class TopicPartition(NamedTuple):
    """A partition of a topic (equal to, and hashed like, kafka-python's namedtuple)."""

    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]"


class Record(Protocol):
    """One consumed record: what the runner reads of kafka-python's ConsumerRecord, of a
    confluent-kafka Message (through `SourceRecord`), or of an in-memory one."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> Headers | None: ...


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A record as the confluent-kafka and in-memory sources hand it out."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()

    @property
    def size(self) -> int:
        """Key, value and headers in bytes: what a topic's size limit is checked against."""
        return len(self.key or b"") + len(self.value or b"") + sum(
            len(k.encode()) + len(v or b"") for k, v in self.headers)


Batch = Mapping[TopicPartition, Sequence[Record]]


class RebalanceListener(Protocol):
    """What a source tells the runner about group membership. It may be called from the
    client's own thread (kafka-python), so the runner only takes notes in it."""

    def assigned(self, partitions: Sequence[TopicPartition]) -> None: ...

    def revoked(self, partitions: Sequence[TopicPartition]) -> None: ...


class SourceUnavailable(Exception):
    """The broker cannot be reached now: retried with backoff, never a crash. `reset`
    asks the runner to close the source and open a new one (a fatal client error)."""

    def __init__(self, message: str, *, reset: bool = False) -> None:
        super().__init__(message)
        self.reset = reset


class CommitRefused(Exception):
    """The group moved on (a rebalance): harmless, since the next owner redelivers and
    the dedupe records skip what was applied."""


class CommitFailed(Exception):
    """The offset commit failed for another reason (broker unreachable, timeout)."""


class RecordSource(Protocol):
    """A consumer group member's view of Kafka; see the module docstring."""

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None: ...

    def poll(self, timeout: float, max_records: int) -> Batch: ...

    def seek(self, tp: TopicPartition, offset: int) -> None: ...

    def pause(self, tp: TopicPartition) -> None: ...

    def resume(self, tp: TopicPartition) -> None: ...

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None: ...

    def assignment(self) -> set[TopicPartition]: ...

    def lag(self) -> dict[TopicPartition, int]: ...

    def close(self) -> None: ...


#: Names of the errors a client (or a broker) gives for a record too large to send.
TOO_LARGE = frozenset({"MessageSizeTooLargeError", "RecordListTooLargeError",
                       "RecordTooLargeError"})


def is_too_large(error: BaseException) -> bool:
    """Whether a failed send was refused for the record's size (it may fit truncated)."""
    flag = getattr(error, "too_large", None)
    if flag is not None:
        return bool(flag)
    # kafka-python raises the error class itself; the confluent publisher's DeliveryFailed
    # names it in `kind` (outbox.confluent.classify)
    return type(error).__name__ in TOO_LARGE or getattr(error, "kind", None) in TOO_LARGE
