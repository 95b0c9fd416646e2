"""Every transition of a partition's state machine (outbox.consumer.partitions), and the
rebalance notes that drive it, against a source that records what it is told."""

from __future__ import annotations

from typing import Any

from outbox.consumer.partitions import Hold, Partitions, RebalanceNotes, State
from outbox.consumer.source import TopicPartition

T0, T1 = TopicPartition("t", 0), TopicPartition("t", 1)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.calls.append(("seek", (tp, offset)))

    def pause(self, tp: TopicPartition) -> None:
        self.calls.append(("pause", tp))

    def resume(self, tp: TopicPartition) -> None:
        self.calls.append(("resume", tp))


def make() -> tuple[Partitions, Recorder]:
    source = Recorder()
    return Partitions(source), source  # type: ignore[arg-type]


def test_assigned_partitions_start_running() -> None:
    parts, source = make()
    assert parts.state(T0) is None  # not assigned
    parts.assigned([T0, T1])
    assert parts.state(T0) is State.RUNNING and parts.state(T1) is State.RUNNING
    assert parts.held() == {} and parts.next_due() is None and source.calls == []


def test_running_to_held_seeks_back_and_pauses() -> None:
    parts, source = make()
    parts.assigned([T0])
    parts.hold(T0, Hold(offset=7, until=100.0))
    assert parts.state(T0) is State.HELD and parts.is_held(T0)
    assert parts.held() == {T0: 7} and parts.next_due() == 100.0
    assert source.calls == [("seek", (T0, 7)), ("pause", T0)]


def test_held_again_the_later_hold_wins() -> None:
    parts, _ = make()
    parts.assigned([T0])
    parts.hold(T0, Hold(offset=7, until=100.0))
    parts.hold(T0, Hold(offset=7, until=250.0))
    assert parts.held() == {T0: 7} and parts.next_due() == 250.0
    assert parts.release_due(200.0) == []  # not due yet: still held
    assert parts.state(T0) is State.HELD


def test_held_to_running_when_due_resumes_and_seeks_to_the_held_record() -> None:
    parts, source = make()
    parts.assigned([T0, T1])
    parts.hold(T0, Hold(offset=7, until=100.0))
    parts.hold(T1, Hold(offset=3, until=300.0))
    source.calls.clear()
    assert parts.release_due(99.9) == []
    assert parts.release_due(100.0) == [T0]
    assert parts.state(T0) is State.RUNNING and parts.state(T1) is State.HELD
    assert source.calls == [("resume", T0), ("seek", (T0, 7))]
    assert parts.held() == {T1: 3} and parts.next_due() == 300.0


def test_revoked_forgets_a_held_partition() -> None:
    parts, source = make()
    parts.assigned([T0])
    parts.hold(T0, Hold(offset=7, until=100.0))
    source.calls.clear()
    parts.revoked([T0])
    assert parts.state(T0) is None and parts.held() == {} and parts.next_due() is None
    assert source.calls == []  # no longer ours: nothing to tell the source
    assert parts.release_due(1e9) == []


def test_revoked_forgets_a_running_partition_and_assigned_again_starts_over() -> None:
    parts, _ = make()
    parts.assigned([T0])
    parts.revoked([T0])
    assert parts.state(T0) is None
    parts.assigned([T0])
    assert parts.state(T0) is State.RUNNING


def test_a_stuck_partition_stays_stuck_after_its_hold_until_it_moves_past_the_record() -> None:
    parts, _ = make()
    parts.assigned([T0])
    parts.hold(T0, Hold(offset=4, until=10.0, stuck=True))
    assert parts.stuck() == {T0: 4}
    assert parts.release_due(10.0) == [T0]
    assert parts.state(T0) is State.RUNNING and parts.stuck() == {T0: 4}  # still red
    parts.moved_past(T0, 4)  # not past it yet
    assert parts.stuck() == {T0: 4}
    parts.moved_past(T0, 5)
    assert parts.stuck() == {}


def test_revoked_clears_a_stuck_mark() -> None:
    parts, _ = make()
    parts.assigned([T0])
    parts.hold(T0, Hold(offset=4, until=10.0, stuck=True))
    parts.revoked([T0])
    assert parts.stuck() == {}


def test_rebalance_notes_are_applied_in_order_on_the_loops_thread() -> None:
    parts, _ = make()
    forgotten: list[TopicPartition] = []
    notes = RebalanceNotes(parts, "g", forgotten.append)
    notes.assigned([T0, T1])
    parts.hold(T0, Hold(offset=1, until=5.0))
    notes.revoked([T0, T1])
    notes.assigned([T1])
    assert parts.state(T0) is State.HELD  # notes wait for apply()
    notes.apply()
    assert parts.state(T0) is None and parts.state(T1) is State.RUNNING
    assert forgotten == [T0, T1]
