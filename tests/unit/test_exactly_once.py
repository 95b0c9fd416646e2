"""The exactly-once sender on the in-memory twins: transactions per shard, fencing, the
progress check at takeover, failures and dead letters (outbox.exactly_once)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from outbox import _unsafe
from outbox.backoff import Throttled
from outbox.cursors import Cursors
from outbox.exactly_once import TxnSender, namespace, transactional_id
from outbox.metrics import RelayMetrics
from outbox.progress import InMemoryProgressLog, progress_topic
from outbox.publisher import Record
from outbox.relay_config import RelayConfig
from outbox.sending import Sender
from outbox.store import Claim, Row
from outbox.txn import Fenced, InMemoryTxnBroker, OpenTransaction, TxnFailed


class TooLarge(Exception):
    permanent = True


class Flaky(Exception):
    pass


class FakeConn:
    """The relay's session: the sender only keeps it alive with SELECT 1 here."""

    def __init__(self) -> None:
        self.heartbeats = 0

    def execute(self, sql: str) -> None:
        assert sql == "SELECT 1"
        self.heartbeats += 1


CONN: Any = FakeConn()


class FakeStore:
    """The rows of an outbox, as the sender sees them through Store."""

    def __init__(self, n: int, shards: int = 2) -> None:
        self.rows = {p: self._row(p, p % shards) for p in range(1, n + 1)}
        self.dead: dict[int, str] = {}
        self.failures: dict[int, str] = {}

    @staticmethod
    def _row(position: int, shard: int, attempts: int = 0) -> Row:
        headers = [("ce_specversion", b"1.0"), ("ce_id", f"id-{position}".encode())]
        return Row(position, shard, attempts, False, "t", f"k{shard}".encode(),
                   f"v{position}".encode(), headers)

    def pending(self, shard: int | None = None) -> list[Row]:
        return [r for p, r in sorted(self.rows.items()) if shard is None or r.shard == shard]

    def claim(self, conn: Any, shards: list[int], per_shard: int, *_: Any) -> Claim:
        rows = [r for s in shards for r in self.pending(s)[:per_shard]]
        return Claim(rows, None, False)

    def acknowledge(self, conn: Any, positions: list[int], keep: bool) -> int:
        return sum(self.rows.pop(p, None) is not None for p in positions)

    def acknowledge_exact(self, conn: Any, done: list[tuple[int, str]], keep: bool) -> int:
        mine = [p for p, i in done if p in self.rows and self.rows[p].event_id == i]
        return self.acknowledge(conn, mine, keep)

    def dead_letter(self, conn: Any, position: int, error: str) -> None:
        self.dead[position] = error
        del self.rows[position]

    def record_failure(self, conn: Any, position: int, error: str, delay: float) -> None:
        self.failures[position] = error
        row = self.rows[position]
        self.rows[position] = row._replace(attempts=row.attempts + 1)


def make(store: FakeStore, broker: InMemoryTxnBroker, name: str = "r1",
         max_attempts: int = 3) -> TxnSender:
    config = RelayConfig(db_url="postgresql://x/db", relay_id=name, max_attempts=max_attempts)
    sender = Sender(name, config, store, RelayMetrics(None),  # type: ignore[arg-type]
                    Throttled(logging.getLogger("test")), lambda: 3600.0, lambda: False)
    return TxnSender(sender, broker.producer, InMemoryProgressLog(broker), "db.outbox",
                     Cursors(store))  # type: ignore[arg-type]


def cycle(txn: TxnSender, store: FakeStore, shards: list[int]) -> int:
    txn.take(CONN, shards, 2)
    return txn.cycle(CONN, store.claim(None, shards, 100).rows).acked


def event_ids(broker: InMemoryTxnBroker) -> list[str]:
    return [dict(r.headers)["ce_id"].decode() for r in broker.committed if r.topic == "t"]


def test_names_are_per_outbox() -> None:
    ns = namespace("postgresql+psycopg://u:p@h/shop", "outbox")
    assert ns == "shop.outbox"
    assert transactional_id(ns, 3) == "outbox-shop.outbox-shard-3"
    assert progress_topic(ns) == "outbox-shop.outbox-progress"
    assert namespace("postgresql://h/we ird", "outbox") == "we_ird.outbox"


def test_each_shard_commits_its_events_and_their_progress() -> None:
    store, broker = FakeStore(10), InMemoryTxnBroker()
    txn = make(store, broker)
    assert cycle(txn, store, [0, 1]) == 10
    assert store.pending() == []
    assert sorted(event_ids(broker)) == sorted(f"id-{p}" for p in range(1, 11))
    progress = InMemoryProgressLog(broker)
    assert progress.last(0) == [(p, f"id-{p}") for p in (2, 4, 6, 8, 10)]
    assert progress.last(1) == [(p, f"id-{p}") for p in (1, 3, 5, 7, 9)]


def test_a_takeover_removes_what_the_previous_owner_committed_but_did_not_delete() -> None:
    store, broker = FakeStore(6), InMemoryTxnBroker()
    first = make(store, broker, "first")
    first.take(CONN, [0, 1], 2)
    # the first relay commits, then dies before its delete
    rows = store.claim(None, [0, 1], 100).rows
    store_ack = store.acknowledge
    store.acknowledge = lambda *a, **k: 0  # type: ignore[method-assign]
    first.cycle(CONN, rows)
    store.acknowledge = store_ack  # type: ignore[method-assign]
    assert len(store.pending()) == 6 and len(event_ids(broker)) == 6
    second = make(store, broker, "second")
    assert cycle(second, store, [0, 1]) == 0  # nothing left to send
    assert store.pending() == []
    assert sorted(event_ids(broker)) == sorted(f"id-{p}" for p in range(1, 7))  # once each


def test_progress_of_an_older_table_deletes_nothing_of_a_new_one() -> None:
    old, broker = FakeStore(4), InMemoryTxnBroker()
    first = make(old, broker, "first")
    first.take(CONN, [0, 1], 2)
    first.cycle(CONN, old.claim(None, [0, 1], 100).rows)
    # the table is made again: the same positions, other events
    new = FakeStore(4)
    new.rows = {p: r._replace(headers=[r.headers[0], ("ce_id", f"new-{p}".encode())])
                for p, r in new.rows.items()}
    assert cycle(make(new, broker, "second"), new, [0, 1]) == 4  # all sent, none skipped
    assert sorted(event_ids(broker))[4:] == [f"new-{p}" for p in range(1, 5)]


def test_without_the_progress_check_the_takeover_sends_them_again() -> None:
    store, broker = FakeStore(6), InMemoryTxnBroker()
    first = make(store, broker, "first")
    first.take(CONN, [0, 1], 2)
    rows = store.claim(None, [0, 1], 100).rows
    store.acknowledge = lambda *a, **k: 0  # type: ignore[method-assign]
    first.cycle(CONN, rows)
    del store.acknowledge
    with _unsafe.disable("progress"):
        cycle(make(store, broker, "second"), store, [0, 1])
    ids = event_ids(broker)
    assert len(ids) == 12 and len(set(ids)) == 6


def test_a_zombie_is_fenced_and_its_open_transaction_aborted() -> None:
    store, broker = FakeStore(4), InMemoryTxnBroker()
    zombie = make(store, broker, "zombie")
    zombie.take(CONN, [0], 2)
    rows = store.claim(None, [0], 100).rows
    batch, progress = zombie._begin(0, rows)  # sends in flight when it pauses
    successor = make(store, broker, "successor")
    successor.take(CONN, [0], 2)  # fences the zombie
    with pytest.raises(Fenced):
        zombie._commit(CONN, 0, batch, progress, False)
    assert 0 not in zombie.producers
    assert event_ids(broker) == []  # the zombie's transaction was aborted
    assert cycle(successor, store, [0]) == 2
    assert event_ids(broker) == ["id-2", "id-4"]


def test_a_failed_send_aborts_the_shards_transaction_and_costs_one_attempt() -> None:
    store = FakeStore(6)
    failing = {"v3"}
    broker = InMemoryTxnBroker(lambda r: Flaky("broker busy")
                               if r.value.decode() in failing else None)
    txn = make(store, broker)
    assert cycle(txn, store, [0, 1]) == 3  # shard 0 committed; shard 1 aborted
    assert event_ids(broker) == ["id-2", "id-4", "id-6"]
    assert store.failures == {3: "Flaky: broker busy"}
    assert [r.position for r in store.pending()] == [1, 3, 5]  # shard 1 sent again later
    assert 1 not in txn.producers  # made again (fencing, progress check) next cycle
    failing.clear()
    assert cycle(txn, store, [0, 1]) == 3
    assert event_ids(broker)[3:] == ["id-1", "id-3", "id-5"]  # in order, once


def test_a_client_that_would_commit_despite_a_failed_record_is_never_asked_to() -> None:
    # kafka-python was seen committing a transaction one of whose records had expired:
    # the sender checks every record's answer first, and commits only when all are in.
    store = FakeStore(6)
    failing = {"v3"}
    broker = InMemoryTxnBroker(lambda r: Flaky("expired") if r.value.decode() in failing
                               else None)
    broker.commit_despite_failures = True
    txn = make(store, broker)
    cycle(txn, store, [0, 1])
    assert [r.position for r in store.pending()] == [1, 3, 5]  # shard 1 not committed
    failing.clear()
    cycle(txn, store, [0, 1])
    assert store.pending() == []
    assert sorted(event_ids(broker)) == sorted(f"id-{p}" for p in range(1, 7))  # none lost


def test_an_event_refused_for_good_is_dead_lettered_alone_and_never_committed() -> None:
    store = FakeStore(6)

    def fail(record: Record) -> BaseException | None:
        return TooLarge("too large") if record.value == b"v3" else None

    broker = InMemoryTxnBroker(fail)
    txn = make(store, broker)
    cycle(txn, store, [0, 1])  # shard 1 fails: it becomes a suspect
    assert txn.suspects == {1}
    cycle(txn, store, [0, 1])  # its head (1) goes alone and commits
    cycle(txn, store, [0, 1])  # shard 1 again: 3 fails among 3, 5
    cycle(txn, store, [0, 1])  # 3 alone: refused, dead-lettered
    assert store.dead == {3: "TooLarge: too large"}
    cycle(txn, store, [0, 1])
    assert store.pending() == []
    assert event_ids(broker) == ["id-2", "id-4", "id-6", "id-1", "id-5"]
    assert b"v3" not in [r.value for r in broker.committed]


def test_kafka_errors_map_onto_what_the_relay_does_with_them() -> None:
    from outbox.errors import ConfigError
    from outbox.txn import TxnFailed, _kafka_python_error, is_fenced

    def named(name: str) -> Exception:
        kind: type[Exception] = type(name, (Exception,), {})
        return kind("from the broker")

    refused = _kafka_python_error(named("TransactionalIdAuthorizationFailedError"))
    assert isinstance(refused, ConfigError) and "WRITE and DESCRIBE" in str(refused)
    assert isinstance(_kafka_python_error(named("ProducerFencedError")), Fenced)
    assert isinstance(_kafka_python_error(named("KafkaTimeoutError")), TxnFailed)
    assert is_fenced(named("InvalidProducerEpochError"))
    assert not is_fenced(named("MessageSizeTooLargeError"))


def test_a_refused_transactional_id_stops_the_take_with_its_reason() -> None:
    from outbox.errors import ConfigError

    store, broker = FakeStore(2), InMemoryTxnBroker()
    txn = make(store, broker)

    def refuse(tid: str) -> Any:
        raise ConfigError(f"Kafka refused the transactional id {tid}")

    txn.make_producer = refuse
    with pytest.raises(ConfigError, match="refused the transactional id"):
        txn.take(CONN, [0, 1], 2)
    assert txn.producers == {}


def test_a_transaction_that_cannot_begin_skips_its_shard_for_the_cycle() -> None:
    store, broker = FakeStore(4), InMemoryTxnBroker()
    txn = make(store, broker)
    txn.take(CONN, [0, 1], 2)
    broken = txn.producers[1]

    def cannot_begin() -> None:
        raise TxnFailed("the coordinator is moving")

    broken.begin = cannot_begin  # type: ignore[method-assign]
    assert txn.cycle(CONN, store.claim(CONN, [0, 1], 100).rows).acked == 2  # shard 0 went
    assert 1 not in txn.producers  # made again (fenced, progress read) next cycle
    assert cycle(txn, store, [0, 1]) == 2
    assert store.pending() == []


class OpenOn(InMemoryProgressLog):
    """A progress log whose partition `shard` has a transaction open (a hanging one)."""

    def __init__(self, broker: InMemoryTxnBroker, shard: int | None) -> None:
        super().__init__(broker)
        self.shard = shard
        self.reads: list[int] = []

    def last(self, shard: int, keepalive: Any = lambda: None) -> list[tuple[int, str]]:
        self.reads.append(shard)
        if shard == self.shard:
            raise OpenTransaction(f"t[{shard}] has a transaction open from offset 4")
        return super().last(shard, keepalive)


def test_a_shard_with_a_transaction_open_on_its_progress_is_left_alone_not_the_others(
        ) -> None:
    store, broker = FakeStore(6), InMemoryTxnBroker()
    txn = make(store, broker)
    txn.progress = progress = OpenOn(broker, 1)
    txn.round(CONN, {0, 1}, 2)
    assert set(txn.producers) == {0}
    assert sorted(event_ids(broker)) == ["id-2", "id-4", "id-6"]  # shard 0's
    assert [r.position for r in store.pending()] == [1, 3, 5]  # shard 1's wait
    txn.round(CONN, {0, 1}, 2)
    assert progress.reads.count(1) == 1  # not tried again before BLOCKED_RETRY
    progress.shard = None  # the transaction was aborted (kafka-transactions.sh)
    txn.blocked[1] = 0.0  # BLOCKED_RETRY has passed
    txn.round(CONN, {0, 1}, 2)
    assert store.pending() == [] and len(event_ids(broker)) == 6
    assert txn.blocked == {}
