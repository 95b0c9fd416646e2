"""The real consumer loop on the in-memory broker and SQLite: batching, duplicates,
retries and holds, attempts that survive restarts and rebalances, every dead-letter
path, commit failures, revocation, stop, outages."""

from __future__ import annotations

import logging
import uuid

import pytest
import sqlalchemy as sa

from outbox import Event
from outbox.consumer import ConsumerRunner, HandlerMisuse, TopicPartition
from outbox.consumer.source import CommitFailed, CommitRefused
from outbox.testing import RecordTooLarge
from tests.unit.consumer_kit import (
    Counter,
    Kit,
    attempts,
    counters,
    events,
    inbox_ids,
    kit,  # noqa: F401  (fixture)
    rows,
    run_until,
)

T0, T1, T2 = (TopicPartition("t", p) for p in range(3))


def poison(*bad: Event) -> object:
    ids = {e.id for e in bad}

    def fail(event: Event) -> None:
        if event.id in ids:
            raise RuntimeError("boom on purpose")
    return fail


def test_each_event_of_every_partition_is_applied_once_and_offsets_follow(kit: Kit  # noqa: F811
                                                                          ) -> None:
    kit.broker.create_topic("t", partitions=3)
    evs = events("t", 30, keys=7)
    for e in evs + evs[:10]:  # the first ten twice
        kit.broker.produce_event(e)
    c = Counter()
    runner = kit.runner(c, max_poll_records=8)
    run_until(runner, lambda: runner.stats.processed + runner.stats.duplicates == 40)
    assert (runner.stats.processed, runner.stats.duplicates) == (30, 10)
    assert runner.stats.batches >= 5  # at most 8 records per transaction
    assert counters(kit.url) == {e.id: 1 for e in evs}
    assert inbox_ids(kit.url, "g") == {e.id for e in evs}
    ends = {tp: kit.broker.end_offset(tp) for tp in kit.broker.partitions("t")}
    assert kit.broker.committed("g") == {tp: n for tp, n in ends.items() if n}
    assert runner.healthy()


def test_a_failing_event_holds_only_its_partition_then_succeeds(kit: Kit  # noqa: F811
                                                                ) -> None:
    kit.broker.create_topic("t", partitions=2)
    first = [kit.broker.produce_event(e, partition=0) for e in events("t", 3, keys=1)]
    assert first
    other = events("t", 3, keys=1, start=3)
    flaky = events("t", 1, start=99)[0]
    kit.broker.produce_event(flaky, partition=1)
    failed_once: list[uuid.UUID] = []

    def fail(event: Event) -> None:
        if event.id == flaky.id and not failed_once:
            failed_once.append(event.id)
            raise ValueError("not yet")

    c = Counter(fail=fail)
    c.retry_backoff = 0.5
    runner = kit.runner(c)
    run_until(runner, lambda: runner.stats.failed == 1)
    assert runner.held_partitions == {T1: 0}  # RUNNING -> HELD at the failed record
    assert attempts(kit.url, "g") == {flaky.id: 1}  # counted in the database
    for e in other:  # the other partition goes on meanwhile
        kit.broker.produce_event(e, partition=0)
    run_until(runner, lambda: runner.stats.processed == 6)
    assert flaky.id not in counters(kit.url)
    run_until(runner, lambda: runner.stats.processed == 7, "the retry")  # HELD -> RUNNING
    assert runner.held_partitions == {}
    assert attempts(kit.url, "g") == {}  # success forgets the attempts
    assert set(counters(kit.url).values()) == {1}
    assert kit.broker.committed("g")[T1] == 1


def test_a_poison_event_is_dead_lettered_after_max_attempts_and_its_partition_moves_on(
    kit: Kit  # noqa: F811
) -> None:
    kit.broker.create_topic("t", partitions=1)
    evs = events("t", 6, keys=2)
    bad = evs[2]
    for e in evs:
        kit.broker.produce_event(e)
    c = Counter(max_attempts=3, fail=poison(bad))
    runner = kit.runner(c)
    run_until(runner, lambda: runner.stats.dead_lettered == 1 and runner.stats.processed == 5)
    assert [e.id for e in c.calls].count(bad.id) == 3
    assert runner.stats.failed == 3
    [dead] = kit.broker.records("t.dlq")
    headers = dict(dead.headers)
    assert (dead.key, dead.value) == (bad.key.encode(), bad.data)
    assert headers["ce_id"] == str(bad.id).encode()
    assert headers["outbox_error"] == b"RuntimeError: boom on purpose"
    assert headers["outbox_reason"] == b"handler-failed"
    assert (headers["outbox_original_topic"], headers["outbox_original_partition"],
            headers["outbox_original_offset"]) == (b"t", b"0", b"2")
    assert bad.id in inbox_ids(kit.url, "g") and attempts(kit.url, "g") == {}
    assert kit.broker.committed("g") == {T0: 6}
    # per key, first applications in partition order despite the retries
    firsts = list(dict.fromkeys(e.payload["i"] for e in c.calls if e.id != bad.id))
    assert firsts == sorted(firsts)


@pytest.mark.parametrize("move", ["restart", "rebalance"])
def test_attempts_count_across_restarts_and_rebalances(move: str, kit: Kit  # noqa: F811
                                                       ) -> None:
    """max_attempts is a total: a consumer that restarts (or whose partition moves to
    another member) between attempts does not start counting again."""
    kit.broker.create_topic("t", partitions=1)
    bad = events("t", 1)[0]
    kit.broker.produce_event(bad)
    calls: list[uuid.UUID] = []

    def fail(event: Event) -> None:
        calls.append(event.id)
        raise RuntimeError("always")

    a = kit.runner(Counter(max_attempts=3, fail=fail))
    run_until(a, lambda: a.stats.failed == 1)
    assert attempts(kit.url, "g") == {bad.id: 1}
    if move == "restart":
        a.close()
        b = kit.runner(Counter(max_attempts=3, fail=fail))
    else:
        b = kit.runner(Counter(max_attempts=3, fail=fail))
        b.run_once(0)  # joins the group
        kit.broker.rebalance("g", {s: ([T0] if s is b.source else [])
                                   for s in kit.broker.members("g")})
        a.run_once(0)
        assert a.held_partitions == {}  # revoked: the hold is forgotten
    run_until(b, lambda: b.stats.dead_lettered == 1)
    assert calls == [bad.id] * 3  # three attempts in total, not 1 + 3
    assert b.stats.failed == 2
    assert len(kit.broker.records("t.dlq")) == 1 and attempts(kit.url, "g") == {}


def test_an_event_that_used_up_its_attempts_before_is_dead_lettered_without_a_call(
    kit: Kit  # noqa: F811
) -> None:
    """A consumer killed after the last attempt was recorded, before the dead letter."""
    kit.broker.create_topic("t", partitions=1)
    bad, good = events("t", 2, keys=1)
    kit.broker.produce_event(bad)
    kit.broker.produce_event(good)
    engine = sa.create_engine(kit.url)
    from outbox.consumer.inbox import CoreInbox
    from outbox.schema import tables

    with engine.begin() as conn:
        for _ in range(3):
            CoreInbox(tables).record_attempt(conn, "g", bad.id, "KeyError: 'x'")
    engine.dispose()
    c = Counter(max_attempts=3)
    runner = kit.runner(c)
    run_until(runner, lambda: runner.stats.dead_lettered == 1 and runner.stats.processed == 1)
    assert [e.id for e in c.calls] == [good.id]
    [dead] = kit.broker.records("t.dlq")
    assert dict(dead.headers)["outbox_error"] == b"KeyError: 'x'"


def test_a_malformed_record_is_dead_lettered_and_the_batch_keeps_the_fast_path(
    kit: Kit  # noqa: F811
) -> None:
    kit.broker.create_topic("t", partitions=1)
    evs = events("t", 4, keys=1)
    for e in evs[:2]:
        kit.broker.produce_event(e)
    kit.broker.produce("t", b'{"i": -1}', b"k0", [("ce_type", b"NoId")])
    kit.broker.produce("t", b"not json{", b"k0", [("ce_id", str(uuid.uuid4()).encode()),
                                                   ("content-type", b"application/json")])
    for e in evs[2:]:
        kit.broker.produce_event(e)
    engine = sa.create_engine(kit.url)
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda conn, cur, stmt, *a: statements.append(stmt))
    c = Counter()
    runner = kit.runner(c, db_url=None, engine=engine)
    run_until(runner, lambda: runner.stats.processed == 4 and runner.stats.malformed == 2)
    assert not [s for s in statements if "SAVEPOINT" in s.upper()], "savepoint path taken"
    assert [e.id for e in c.calls] == [e.id for e in evs]  # once each: nothing redone
    dead = kit.broker.records("t.dlq")
    assert [d.value for d in dead] == [b'{"i": -1}', b"not json{"]
    assert {dict(d.headers)["outbox_reason"] for d in dead} == {b"malformed"}
    assert [dict(d.headers)["outbox_original_offset"] for d in dead] == [b"2", b"3"]
    assert kit.broker.committed("g") == {T0: 6}
    engine.dispose()


def test_the_dead_letter_copy_is_sent_after_the_batch_committed(kit: Kit  # noqa: F811
                                                                 ) -> None:
    kit.broker.create_topic("t", partitions=2)
    before, bad, after = events("t", 3, keys=1)
    elsewhere = events("t", 2, keys=1, start=10)
    for e in (before, bad, after):
        kit.broker.produce_event(e, partition=0)
    for e in elsewhere:
        kit.broker.produce_event(e, partition=1)
    seen_at_send: list[set[uuid.UUID]] = []

    def probe(record: object) -> None:  # runs while the copy is being sent
        seen_at_send.append(set(counters(kit.url)) | inbox_ids(kit.url, "g"))
        return None

    runner = kit.runner(Counter(max_attempts=1, fail=poison(bad)),
                        dead_letters=kit.broker.publisher(fail=probe))  # type: ignore[arg-type]
    run_until(runner, lambda: runner.stats.dead_lettered == 1 and runner.stats.processed == 4)
    # the batch's effects (before the poison, and on the other partition) were committed,
    # visible from another connection, before the dead-letter copy went out; the event
    # after the poison waited for the copy
    assert seen_at_send == [{before.id, elsewhere[0].id, elsewhere[1].id}]
    assert set(counters(kit.url)) == {before.id, after.id, *(e.id for e in elsewhere)}


def test_a_dead_letter_copy_kafka_does_not_take_holds_the_partition_at_the_record(
    kit: Kit  # noqa: F811
) -> None:
    kit.broker.create_topic("t", partitions=1)
    evs = events("t", 4, keys=1)
    for e in evs:
        kit.broker.produce_event(e)
    refusals = [ConnectionError("broker unreachable")]

    def flaky(record: object) -> BaseException | None:
        return refusals.pop() if refusals else None

    publisher = kit.broker.publisher(fail=flaky)  # type: ignore[arg-type]
    runner = kit.runner(Counter(max_attempts=1, fail=poison(evs[1])), dead_letters=publisher)
    run_until(runner, lambda: runner.stats.failed == 1 and runner.held_partitions != {})
    assert runner.stats.dead_lettered == 0 and runner.held_partitions == {T0: 1}
    assert kit.broker.committed("g") == {T0: 1}  # not past the record without its copy
    assert set(counters(kit.url)) == {evs[0].id}  # the records after it wait
    assert runner.healthy() and publisher.recovered == 1  # waiting heals it: not stuck
    run_until(runner, lambda: runner.stats.dead_lettered == 1 and runner.stats.processed == 3,
              "the copy sent again")
    assert kit.broker.committed("g") == {T0: 4} and set(counters(kit.url).values()) == {1}


def test_a_copy_too_large_is_truncated_and_one_too_large_even_so_is_stuck_and_red(
    kit: Kit, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    kit.broker.create_topic("t", partitions=2)
    kit.broker.create_topic("t.dlq", max_message_bytes=2000)
    big = Event(topic="t", key="k", type="Big", payload={}, data=b'"' + b"x" * 5000 + b'"')
    kit.broker.produce_event(big, partition=0)
    runner = kit.runner(Counter(max_attempts=1, fail=poison(big)))
    run_until(runner, lambda: runner.stats.dead_lettered == 1)
    [copy] = kit.broker.records("t.dlq")
    headers = dict(copy.headers)
    assert copy.value == b"" and headers["outbox_truncated"] == b"value"
    assert int(headers["outbox_original_size"]) > 5000 and runner.healthy()

    kit.broker.create_topic("t.dlq", max_message_bytes=100)  # not even the headers fit
    big2 = Event(topic="t", key="k", type="Big", payload={}, data=b'"' + b"y" * 5000 + b'"')
    after = events("t", 1, keys=1)[0]
    kit.broker.produce_event(big2, partition=1)
    kit.broker.produce_event(after, partition=1)
    runner.consumer.fail = poison(big2)  # type: ignore[attr-defined]
    run_until(runner, lambda: not runner.healthy())
    assert runner.partitions.stuck() == {T1: 0}
    assert any("cannot dead-letter t[1] offset 0" in r.getMessage() and "even truncated"
               in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert after.id not in counters(kit.url)
    kit.broker.create_topic("t.dlq", max_message_bytes=10**6)
    runner.partitions.release_due(float("inf"))  # no need to wait out the hold here
    run_until(runner, lambda: runner.stats.processed == 1 and runner.stats.dead_lettered == 2)
    assert runner.healthy() and runner.partitions.stuck() == {}


@pytest.mark.parametrize("error", [CommitRefused("rebalanced"), CommitFailed("timeout")])
def test_a_failed_offset_commit_redelivers_and_the_dedupe_records_skip_it(
    error: Exception, kit: Kit, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    kit.broker.create_topic("t", partitions=1)
    evs = events("t", 5, keys=1)
    for e in evs:
        kit.broker.produce_event(e)
    kit.broker.fail_commits("g", error)
    first = kit.runner(Counter())
    run_until(first, lambda: first.stats.processed == 5)
    assert kit.broker.committed("g") == {}
    expected = ("offset commit refused after a rebalance" if isinstance(error, CommitRefused)
                else "offset commit failed")
    assert expected in caplog.text
    first.close()
    second = kit.runner(Counter())
    run_until(second, lambda: second.stats.duplicates == 5)
    assert second.stats.processed == 0 and set(counters(kit.url).values()) == {1}
    assert kit.broker.committed("g") == {T0: 5}


def test_stop_in_the_middle_of_a_batch_commits_what_is_done_and_rewinds_the_rest(
    kit: Kit  # noqa: F811
) -> None:
    kit.broker.create_topic("t", partitions=1)
    evs = events("t", 6, keys=1)
    for e in evs:
        kit.broker.produce_event(e)
    runner: ConsumerRunner | None = None

    def stop_at_3(event: Event) -> None:
        if event.payload["i"] == 2:
            assert runner is not None
            runner.stop()

    runner = kit.runner(Counter(fail=stop_at_3))
    runner.run_once(0.1)
    assert set(counters(kit.url)) == {e.id for e in evs[:3]}
    assert kit.broker.committed("g") == {T0: 3}
    assert runner.source is not None and runner.source.position(T0) == 3  # type: ignore[attr-defined]


def test_a_handler_that_commits_stops_the_runner_with_nothing_committed(kit: Kit  # noqa: F811
                                                                        ) -> None:
    kit.broker.create_topic("t", partitions=1)
    evs = events("t", 4, keys=1)
    for e in evs:
        kit.broker.produce_event(e)

    def commit(event: Event) -> None:
        if event.payload["i"] == 2:
            raise AssertionError("unreachable")

    class Commits(Counter):
        def handle(self, event: Event, session: sa.orm.Session) -> None:
            super().handle(event, session)
            if event.payload["i"] == 2:
                session.commit()

    runner = kit.runner(Commits())
    with pytest.raises(HandlerMisuse, match=rf"Commits\.handle called session\.commit\(\) "
                                            rf"on event {evs[2].id}"):
        run_until(runner, lambda: False)
    assert counters(kit.url) == {} and inbox_ids(kit.url, "g") == set()
    assert kit.broker.committed("g") == {}


def test_an_unreachable_broker_is_an_outage_retried_not_a_crash(kit: Kit  # noqa: F811
                                                                ) -> None:
    from outbox.service import Outage as Unavailable

    kit.broker.create_topic("t", partitions=1)
    runner = kit.runner(Counter())
    runner.run_once(0)
    assert runner.healthy()
    kit.broker.down = True
    with pytest.raises(Unavailable, match="Kafka unavailable"):
        runner.run_once(0)
    assert not runner.healthy()
    kit.broker.down = False
    kit.broker.produce_event(events("t", 1)[0])
    run_until(runner, lambda: runner.stats.processed == 1)
    assert runner.healthy()


def test_external_mode_records_the_event_after_the_handler_and_retries_alone(
    kit: Kit  # noqa: F811
) -> None:
    kit.broker.create_topic("t", partitions=1)
    evs = events("t", 4, keys=1)
    for e in evs + evs[:1]:
        kit.broker.produce_event(e)
    seen_own_record: list[bool] = []

    class Mailer(Counter):
        external = True

        def handle(self, event: Event, session: sa.orm.Session) -> None:
            seen_own_record.append(event.id in inbox_ids(kit.url, "g"))
            super().handle(event, session)

    runner = kit.runner(Mailer(max_attempts=2, fail=poison(evs[1])))
    run_until(runner, lambda: runner.stats.dead_lettered == 1 and runner.stats.processed == 3
              and runner.stats.duplicates == 1)
    assert not any(seen_own_record)
    assert inbox_ids(kit.url, "g") == {e.id for e in evs}  # the dead one too
    assert set(counters(kit.url)) == {evs[0].id, evs[2].id, evs[3].id}
    assert attempts(kit.url, "g") == {} and runner.stats.failed == 2


def test_old_dedupe_records_and_attempts_are_purged(kit: Kit) -> None:  # noqa: F811
    runner = kit.runner(Counter(), purge_batch=2)
    runner.consumer.inbox_retention = 60
    engine = sa.create_engine(kit.url)
    from datetime import UTC, datetime, timedelta

    old = datetime.now(UTC) - timedelta(seconds=3600)
    with engine.begin() as c:
        for i in range(5):
            c.execute(sa.text("INSERT INTO outbox_inbox VALUES ('g', :e, :t)"),
                      {"e": uuid.uuid4().hex, "t": old if i < 4 else datetime.now(UTC)})
        c.execute(sa.text("INSERT INTO outbox_attempts VALUES ('g', :e, 1, 'x', :t)"),
                  {"e": uuid.uuid4().hex, "t": old})
    engine.dispose()
    assert runner.purge_inbox() == 4
    assert len(rows(kit.url, "SELECT * FROM outbox_inbox")) == 1
    assert rows(kit.url, "SELECT * FROM outbox_attempts") == []


def test_records_too_large_for_the_in_memory_topic_are_refused() -> None:
    from outbox.testing import InMemoryBroker

    broker = InMemoryBroker()
    broker.create_topic("small", max_message_bytes=3)
    with pytest.raises(RecordTooLarge):
        broker.produce("small", b"four")


def test_a_copy_sent_but_not_recorded_as_processed_is_sent_again_before_moving_on(
    kit: Kit, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """The database fails between the copy's ack and recording the event: the partition
    does not move past the record; the copy goes again (at-least-once), then it does."""
    kit.broker.create_topic("t", partitions=1)
    evs = events("t", 3, keys=1)
    for e in evs:
        kit.broker.produce_event(e)
    runner = kit.runner(Counter(max_attempts=1, fail=poison(evs[1])))
    real = runner.db.inbox.mark_processed
    failures = [sa.exc.OperationalError("INSERT", {}, Exception("database restarting"))]

    def flaky(conn: object, group: str, ids: list[uuid.UUID]) -> object:
        if failures and list(ids) == [evs[1].id]:  # the dead letter's record, not a claim
            raise failures.pop()
        return real(conn, group, ids)  # type: ignore[arg-type]

    monkeypatch.setattr(runner.db.inbox, "mark_processed", flaky)
    run_until(runner, lambda: not failures and runner.held_partitions == {T0: 1})
    assert kit.broker.committed("g") == {T0: 1} and runner.stats.dead_lettered == 0
    runner.partitions.release_due(float("inf"))
    run_until(runner, lambda: runner.stats.dead_lettered == 1 and runner.stats.processed == 2)
    assert len(kit.broker.records("t.dlq")) == 2  # sent twice: at least once
    assert evs[1].id in inbox_ids(kit.url, "g") and kit.broker.committed("g") == {T0: 3}


def test_a_database_outage_fails_the_batch_which_is_redelivered_whole(
    kit: Kit, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    from outbox.service import Outage as Unavailable

    kit.broker.create_topic("t", partitions=2)
    evs = events("t", 6, keys=3)
    for e in evs:
        kit.broker.produce_event(e)
    c = Counter()
    runner = kit.runner(c)
    real = runner.db.inbox.claim
    down = [True]

    def claim(*args: object) -> object:
        if down[0]:
            raise sa.exc.OperationalError("INSERT", {}, Exception("connection refused"))
        return real(*args)

    monkeypatch.setattr(runner.db.inbox, "claim", claim)
    with pytest.raises(Unavailable, match="database unavailable"):
        run_until(runner, lambda: False)
    assert not runner.healthy() and runner.stats.failed == 0 and c.calls == []
    assert kit.broker.committed("g") == {}
    down[0] = False
    run_until(runner, lambda: runner.stats.processed == 6)  # the same records, again
    assert runner.healthy() and set(counters(kit.url).values()) == {1}
