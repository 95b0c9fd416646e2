"""What `outbox status` reports: gathered from its sources, rendered as text or JSON.

`gather` takes its sources behind two protocols, so it runs the same on PostgreSQL and
Kafka (`PostgresOutbox` here, `outbox.kafka_lag.KafkaGroupOffsets`) as on the in-memory
twins the unit tests feed it (`StaticOutbox`, `StaticOffsets`).

`outbox status --json` prints `as_json(status)`, one document of this schema (version 1;
a field is only ever added, and `version` goes up if one changes meaning):

    version                 int     1
    taken_at                str     the database's clock, ISO 8601
    pending                 int     events not yet published
    oldest_pending_seconds  float?  age of the oldest of them (null: none pending)
    dead_letters            int     events the relay gave up on
    shard_count             int
    positions_drawn         int?    positions writers drew so far, rolled-back ones too
                                    (null: the role may not read the sequence)
    shards                  list    per shard with pending events: shard int, pending
                                    int, oldest_pending_seconds float, max_attempts int,
                                    owner str? (the relay holding it), outside_shard_count
                                    bool (no relay will ever take it)
    relays                  list    live relays: name str, pid int, addr str? (null:
                                    local socket), shards [int]
    consumer_groups         list    group str, lag int? (null: not read from Kafka),
                                    retrying_events int, max_attempts int, partitions
                                    [topic str, partition int, committed int, end int,
                                    lag int, held {event_id str, attempts int,
                                    last_error str?}?], dead_letter_topics {topic: records}?,
                                    error str?
    errors                  [str]   what could not be read (the command exits 1)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from outbox.consumer.source import TopicPartition

if TYPE_CHECKING:
    import psycopg

    from outbox.store import Store

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ShardBacklog:
    shard: int
    pending: int
    oldest_pending_seconds: float
    max_attempts: int


@dataclass(frozen=True)
class RelayInfo:
    name: str
    pid: int
    addr: str | None
    shards: tuple[int, ...]


@dataclass(frozen=True)
class Held:
    """The event a held partition waits on: the group's record at its committed offset,
    which the group is retrying."""

    event_id: str
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int
    end: int
    held: Held | None = None

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)


@dataclass
class GroupStatus:
    group: str
    retrying_events: int = 0
    max_attempts: int = 0
    partitions: list[PartitionLag] | None = None  # None: Kafka not read
    dead_letter_topics: dict[str, int] | None = None
    error: str | None = None

    @property
    def lag(self) -> int | None:
        return None if self.partitions is None else sum(p.lag for p in self.partitions)


@dataclass
class Status:
    taken_at: datetime
    shard_count: int
    shards: list[ShardBacklog]
    dead_letters: int
    relays: list[RelayInfo]
    positions_drawn: int | None = None
    groups: list[GroupStatus] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self.shards)

    @property
    def oldest_pending_seconds(self) -> float | None:
        return max((s.oldest_pending_seconds for s in self.shards), default=None)

    def owner(self, shard: int) -> str | None:
        return next((r.name for r in self.relays if shard in r.shards), None)


class OutboxReader(Protocol):
    """What `outbox status` reads from the outbox's database."""

    def now(self) -> datetime: ...
    def backlog(self) -> list[ShardBacklog]: ...
    def dead_letters(self) -> int: ...
    def relays(self) -> list[RelayInfo]: ...
    def shard_count(self) -> int: ...
    def positions_drawn(self) -> int | None: ...
    def group_retries(self) -> dict[str, tuple[int, int]]: ...
    def retrying(self, group: str, event_ids: list[str]) -> dict[str, Held]: ...


class OffsetsUnavailable(Exception):
    """Kafka could not be read (unreachable, a timeout, refused): the message says why."""


class GroupOffsets(Protocol):
    """What `outbox status` reads from Kafka about consumer groups. Implementations
    raise OffsetsUnavailable for anything Kafka did not answer."""

    def committed(self, group: str) -> dict[TopicPartition, int]: ...
    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    def record_counts(self, topics: list[str]) -> dict[str, int]:
        """Records each existing topic holds now (end - beginning offsets, summed)."""
        ...
    def event_ids_at(self, offsets: Mapping[TopicPartition, int]
                     ) -> dict[TopicPartition, str]:
        """The event id (ce_id header) of the record at each offset, where one is."""
        ...


def gather(outbox: OutboxReader, kafka: GroupOffsets | None = None,
           groups: Iterable[str] = (), dlq_suffix: str = ".dlq") -> Status:
    """One status: the outbox's, and that of `groups` plus every group with events in
    retry. Kafka's part (lag, held partitions, dead-letter counts) needs `kafka`; when
    Kafka does not answer, the groups say so and `errors` has one line."""
    shards = outbox.backlog()  # first: on a database without the tables, it names them
    status = Status(taken_at=outbox.now(), shards=shards, dead_letters=outbox.dead_letters(),
                    relays=outbox.relays(), shard_count=outbox.shard_count(),
                    positions_drawn=outbox.positions_drawn())
    retries = outbox.group_retries()
    for name in dict.fromkeys([*groups, *sorted(retries)]):
        events, most = retries.get(name, (0, 0))
        status.groups.append(GroupStatus(name, retrying_events=events, max_attempts=most))
    if kafka is None or not status.groups:
        return status
    for group in status.groups:
        try:
            _read_group(group, outbox, kafka, dlq_suffix)
        except OffsetsUnavailable as exc:
            group.error = f"Kafka: {exc}"
            status.errors.append(f"consumer group {group.group}: Kafka: {exc}")
    return status


def _read_group(group: GroupStatus, outbox: OutboxReader, kafka: GroupOffsets,
                dlq_suffix: str) -> None:
    committed = kafka.committed(group.group)
    tps = sorted(committed)
    ends = kafka.end_offsets(tps) if tps else {}
    behind = {tp: committed[tp] for tp in tps if ends.get(tp, 0) > committed[tp]}
    held: dict[TopicPartition, Held] = {}
    if behind and group.retrying_events:
        ids = kafka.event_ids_at(behind)
        retrying = outbox.retrying(group.group, sorted(
            {i for i in ids.values() if _is_uuid(i)}))
        held = {tp: retrying[i] for tp, i in ids.items() if i in retrying}
    group.partitions = [PartitionLag(tp.topic, tp.partition, committed[tp],
                                     ends.get(tp, committed[tp]), held.get(tp))
                        for tp in tps]
    topics = sorted({tp.topic + dlq_suffix for tp in tps})
    group.dead_letter_topics = kafka.record_counts(topics) if topics else {}


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


# -- rendering ---------------------------------------------------------------------------


def as_json(status: Status) -> dict[str, Any]:
    """The `--json` document (the schema is in this module's docstring)."""
    return {
        "version": SCHEMA_VERSION,
        "taken_at": status.taken_at.isoformat(),
        "pending": status.pending,
        "oldest_pending_seconds": status.oldest_pending_seconds,
        "dead_letters": status.dead_letters,
        "shard_count": status.shard_count,
        "positions_drawn": status.positions_drawn,
        "shards": [{"shard": s.shard, "pending": s.pending,
                    "oldest_pending_seconds": s.oldest_pending_seconds,
                    "max_attempts": s.max_attempts, "owner": status.owner(s.shard),
                    "outside_shard_count": s.shard >= status.shard_count}
                   for s in status.shards],
        "relays": [{"name": r.name, "pid": r.pid, "addr": r.addr, "shards": list(r.shards)}
                   for r in status.relays],
        "consumer_groups": [{
            "group": g.group, "lag": g.lag, "retrying_events": g.retrying_events,
            "max_attempts": g.max_attempts,
            "partitions": [{"topic": p.topic, "partition": p.partition,
                            "committed": p.committed, "end": p.end, "lag": p.lag,
                            "held": None if p.held is None else {
                                "event_id": p.held.event_id, "attempts": p.held.attempts,
                                "last_error": p.held.last_error}}
                           for p in g.partitions or ()],
            "dead_letter_topics": g.dead_letter_topics, "error": g.error,
        } for g in status.groups],
        "errors": list(status.errors),
    }


def text_lines(status: Status) -> list[str]:
    """The plain `outbox status` report, one line each."""
    oldest = status.oldest_pending_seconds
    lines = [f"pending events: {status.pending}   oldest pending: "
             f"{f'{oldest:.1f}s' if oldest is not None else '-'}   dead letters: "
             f"{status.dead_letters}   shards: {status.shard_count}"]
    unowned = []
    for s in status.shards:
        flag = ""
        if s.shard >= status.shard_count:
            flag = "   <- OUTSIDE THE SHARD COUNT: no relay will ever take it"
        elif status.owner(s.shard) is None:
            flag = "   <- NO OWNER"
        if flag:
            unowned.append(s.shard)
        lines.append(f"  shard {s.shard:>4}: {s.pending} pending, oldest "
                     f"{s.oldest_pending_seconds:.1f}s, max attempts {s.max_attempts}{flag}")
    if unowned:
        lines.append(f"warning: pending events in {len(unowned)} shard(s) no live relay owns: "
                     f"{','.join(map(str, unowned))}")
    lines.append(f"live relays: {len(status.relays)}")
    for r in status.relays:
        lines.append(f"  {r.name} (pid {r.pid}, {r.addr or 'local'}): shards "
                     f"{','.join(map(str, r.shards)) or 'none'}")
    if status.groups:
        lines.append(f"consumer groups: {len(status.groups)}")
    for g in status.groups:
        lines.append(f"  {g.group}: {group_summary(g)}")
        for p in g.partitions or ():
            lines.append(f"    {p.topic}[{p.partition}]: committed {p.committed}, end {p.end}, "
                         f"lag {p.lag}{held_note(p.held)}")
    return lines


def group_summary(g: GroupStatus) -> str:
    """One line about a group: lag, events in retry, dead letters (or why not known)."""
    parts = [("lag not read (no --kafka)" if g.error is None else g.error)
             if g.partitions is None else
             f"lag {g.lag} over {len(g.partitions)} partition(s)"]
    if g.retrying_events:
        parts.append(f"{g.retrying_events} event(s) in retry (most attempts {g.max_attempts})")
    if g.dead_letter_topics is not None:
        parts.append("dead letters: " + (", ".join(
            f"{t} {n}" for t, n in g.dead_letter_topics.items()) or "no dead-letter topic"))
    return "; ".join(parts)


def held_note(held: Held | None) -> str:
    if held is None:
        return ""
    error = (held.last_error or "").splitlines()[0][:120] if held.last_error else "-"
    return f"   <- HELD on event {held.event_id} ({held.attempts} attempts: {error})"


# -- rates between two samples -----------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """Per second, between two statuses. No counter of published events exists (the
    relay deletes what it published), so `published` is derived: positions drawn, minus
    the backlog's growth, minus new dead letters. Positions of rolled-back transactions
    count as published, so it is an upper bound; None without `positions_drawn`."""

    seconds: float
    backlog: float
    written: float | None
    published: float | None

    @classmethod
    def between(cls, before: Status, after: Status) -> Rates | None:
        dt = (after.taken_at - before.taken_at).total_seconds()
        if dt <= 0:
            return None
        backlog = after.pending - before.pending
        if before.positions_drawn is None or after.positions_drawn is None:
            return cls(dt, backlog / dt, None, None)
        drawn = after.positions_drawn - before.positions_drawn
        # Dead letters that left (retried: drawn again; purged) published nothing.
        dead = max(0, after.dead_letters - before.dead_letters)
        return cls(dt, backlog / dt, drawn / dt, max(0, drawn - backlog - dead) / dt)


# -- the in-memory twins -----------------------------------------------------------------


@dataclass
class StaticOutbox:
    """An OutboxReader on fixed data (tests, examples)."""

    taken_at: datetime
    shards: list[ShardBacklog] = field(default_factory=list)
    dead: int = 0
    live_relays: list[RelayInfo] = field(default_factory=list)
    count: int = 16
    drawn: int | None = 0
    retries: dict[str, tuple[int, int]] = field(default_factory=dict)
    attempts: dict[tuple[str, str], Held] = field(default_factory=dict)  # (group, id)

    def now(self) -> datetime:
        return self.taken_at

    def backlog(self) -> list[ShardBacklog]:
        return list(self.shards)

    def dead_letters(self) -> int:
        return self.dead

    def relays(self) -> list[RelayInfo]:
        return list(self.live_relays)

    def shard_count(self) -> int:
        return self.count

    def positions_drawn(self) -> int | None:
        return self.drawn

    def group_retries(self) -> dict[str, tuple[int, int]]:
        return dict(self.retries)

    def retrying(self, group: str, event_ids: list[str]) -> dict[str, Held]:
        return {i: self.attempts[group, i] for i in event_ids if (group, i) in self.attempts}


@dataclass
class StaticOffsets:
    """A GroupOffsets on fixed data; `down` makes every call raise OffsetsUnavailable."""

    commits: dict[str, dict[TopicPartition, int]] = field(default_factory=dict)
    ends: dict[TopicPartition, int] = field(default_factory=dict)
    topic_records: dict[str, int] = field(default_factory=dict)
    ids: dict[tuple[TopicPartition, int], str] = field(default_factory=dict)
    down: str | None = None

    def _check(self) -> None:
        if self.down:
            raise OffsetsUnavailable(self.down)

    def committed(self, group: str) -> dict[TopicPartition, int]:
        self._check()
        return dict(self.commits.get(group, {}))

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        self._check()
        return {tp: self.ends[tp] for tp in tps if tp in self.ends}

    def record_counts(self, topics: list[str]) -> dict[str, int]:
        self._check()
        return {t: self.topic_records[t] for t in topics if t in self.topic_records}

    def event_ids_at(self, offsets: Mapping[TopicPartition, int]
                     ) -> dict[TopicPartition, str]:
        self._check()
        return {tp: self.ids[tp, o] for tp, o in offsets.items() if (tp, o) in self.ids}


# -- PostgreSQL --------------------------------------------------------------------------


class PostgresOutbox:
    """The OutboxReader on PostgreSQL: store.Store's statements on one connection,
    opened on first use and again after it broke (psycopg.Error goes to the caller)."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], store: Store) -> None:
        self._connect = connect
        self.store = store
        self._conn: psycopg.Connection[Any] | None = None

    def _c(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self.close()
            self._conn = self._connect()
        return self._conn

    def now(self) -> datetime:
        return self.store.now(self._c())

    def backlog(self) -> list[ShardBacklog]:
        return [ShardBacklog(r["shard"], r["pending"], r["oldest_seconds"], r["max_attempts"])
                for r in self.store.backlog(self._c())]

    def dead_letters(self) -> int:
        return self.store.count_dead_letters(self._c())

    def relays(self) -> list[RelayInfo]:
        return [RelayInfo(r["application_name"] or str(r["pid"]), r["pid"], r["addr"],
                          tuple(r["shards"])) for r in self.store.relays(self._c())]

    def shard_count(self) -> int:
        return self.store.shard_count(self._c())

    def positions_drawn(self) -> int | None:
        return self.store.positions_drawn(self._c())

    def group_retries(self) -> dict[str, tuple[int, int]]:
        return self.store.group_retries(self._c())

    def retrying(self, group: str, event_ids: list[str]) -> dict[str, Held]:
        return {i: Held(i, n, error)
                for i, (n, error) in self.store.retrying(self._c(), group, event_ids).items()}

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
