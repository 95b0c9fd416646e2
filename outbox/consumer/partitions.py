"""Each assigned partition's state, in one place.

    (assigned) -> RUNNING --hold(offset, until)--> HELD --release_due(now >= until)--> RUNNING
                                                     |  hold again: the later hold wins
    any state --revoked--> forgotten (the next owner starts from the committed offset)

A partition is held while a failed event waits for its retry, or while its dead-letter
copy cannot be sent (`stuck` when no retry can help: the copy is too large even
truncated; the health check is red while any partition is stuck). Holding seeks the
source back to the held offset and pauses the partition; releasing resumes it and seeks
there again, so the held record is the next one polled.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from outbox.consumer.source import RecordSource, TopicPartition

log = logging.getLogger("outbox.consumer")


class State(enum.Enum):
    RUNNING = "running"
    HELD = "held"


@dataclass
class Hold:
    """Why and until when a partition waits: its record at `offset` is next."""

    offset: int
    until: float
    stuck: bool = False


@dataclass
class Partition:
    tp: TopicPartition
    state: State = State.RUNNING
    hold: Hold | None = None


class Partitions:
    """The state machine of every partition the source assigned."""

    def __init__(self, source: RecordSource | None = None) -> None:
        self.source = source
        self._all: dict[TopicPartition, Partition] = {}

    def assigned(self, tps: list[TopicPartition]) -> None:
        """New partitions start RUNNING; one assigned again keeps its state."""
        for tp in tps:
            self._all.setdefault(tp, Partition(tp))

    def revoked(self, tps: list[TopicPartition]) -> None:
        """Forget them: holds, stuck flags and all (the source no longer has them)."""
        for tp in tps:
            self._all.pop(tp, None)

    def state(self, tp: TopicPartition) -> State | None:
        """RUNNING, HELD, or None for a partition not (or no longer) assigned."""
        p = self._all.get(tp)
        return p.state if p is not None else None

    def hold(self, tp: TopicPartition, hold: Hold) -> None:
        """RUNNING or HELD -> HELD at `hold.offset` until `hold.until`."""
        p = self._all.setdefault(tp, Partition(tp))
        p.state, p.hold = State.HELD, hold
        if self.source is not None:
            self.source.seek(tp, hold.offset)
            self.source.pause(tp)

    def release_due(self, now: float) -> list[TopicPartition]:
        """HELD -> RUNNING for every hold that is due; returns those partitions. A stuck
        partition stays stuck (red health) until its record is dead-lettered."""
        due = [p for p in self._all.values()
               if p.state is State.HELD and p.hold is not None and p.hold.until <= now]
        for p in due:
            assert p.hold is not None
            offset = p.hold.offset
            p.state = State.RUNNING
            if not p.hold.stuck:
                p.hold = None
            if self.source is not None:
                self.source.resume(p.tp)
                self.source.seek(p.tp, offset)
        return [p.tp for p in due]

    def moved_past(self, tp: TopicPartition, next_offset: int) -> None:
        """Records before `next_offset` are done: a stuck mark below it is cleared."""
        p = self._all.get(tp)
        if p is not None and p.state is State.RUNNING and p.hold is not None \
                and p.hold.offset < next_offset:
            p.hold = None

    def is_held(self, tp: TopicPartition) -> bool:
        p = self._all.get(tp)
        return p is not None and p.state is State.HELD

    def held(self) -> dict[TopicPartition, int]:
        """Partitions waiting: partition -> the offset they wait at."""
        return {tp: p.hold.offset for tp, p in self._all.items()
                if p.state is State.HELD and p.hold is not None}

    def stuck(self) -> dict[TopicPartition, int]:
        """Partitions whose record cannot be dead-lettered even truncated."""
        return {tp: p.hold.offset for tp, p in self._all.items()
                if p.hold is not None and p.hold.stuck}

    def next_due(self) -> float | None:
        """When the earliest hold ends (None without holds)."""
        ends = [p.hold.until for p in self._all.values()
                if p.state is State.HELD and p.hold is not None]
        return min(ends) if ends else None

    def clear(self) -> None:
        self._all.clear()


class RebalanceNotes:
    """The runner's rebalance listener. A client may call it from its own thread
    (kafka-python does), so it only takes notes; `apply` replays them on the loop's
    thread, between batches: assigned partitions start RUNNING, revoked ones are
    forgotten (`on_revoked` lets the runner drop their metrics)."""

    def __init__(self, partitions: Partitions, group: str,
                 on_revoked: Callable[[TopicPartition], None] | None = None) -> None:
        self.partitions = partitions
        self.group = group
        self.on_revoked = on_revoked
        self._notes: list[tuple[bool, list[TopicPartition]]] = []
        self._lock = threading.Lock()

    def assigned(self, partitions: Sequence[TopicPartition]) -> None:
        self._note(True, partitions)

    def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        self._note(False, partitions)

    def _note(self, assigned: bool, tps: Sequence[TopicPartition]) -> None:
        ours = sorted(TopicPartition(t.topic, t.partition) for t in tps)
        with self._lock:
            self._notes.append((assigned, ours))
        log.info("consumer %s: partitions %s: %s", self.group,
                 "assigned" if assigned else "revoked",
                 ", ".join(str(tp) for tp in ours) or "none")

    def apply(self) -> None:
        with self._lock:
            notes, self._notes = self._notes, []
        for assigned, tps in notes:
            if assigned:
                self.partitions.assigned(tps)
                continue
            self.partitions.revoked(tps)  # holds and stuck marks go with them
            if self.on_revoked is not None:
                for tp in tps:
                    self.on_revoked(tp)
