"""The relay's cursors and its pipelined claim skip nothing that commits late
(docs/design.md, "Cursors"): a transaction that drew a lower position and commits after
the relay read past it still has its event sent before its key's next one."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.keys import shard_of
from outbox.publisher import InMemoryPublisher
from outbox.relay import Relay, RelayConfig
from outbox.store import Store

SHARDS = 16


def _same_shard(key: str) -> str:
    want = shard_of(key, SHARDS)
    return next(k for k in (f"other-{i}" for i in range(10_000)) if shard_of(k, SHARDS) == want)


class _Paused:
    """A writer transaction held between its event write and its COMMIT."""

    def __init__(self, engine: sa.Engine, box: Outbox, key: str, name: str) -> None:
        self.written = threading.Event()
        self.go = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(engine, box, key, name))

    def _run(self, engine: sa.Engine, box: Outbox, key: str, name: str) -> None:
        with engine.connect() as conn:
            def hold(_: sa.Connection) -> None:
                self.written.set()
                assert self.go.wait(30)

            sa.event.listen(conn, "commit", hold)
            with Session(bind=conn) as s, s.begin():
                box.publish(s, topic="t", key=key, type=name, payload={})

    def __enter__(self) -> _Paused:
        self._thread.start()
        assert self.written.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.go.set()
        self._thread.join(30)


def _publish(engine: sa.Engine, box: Outbox, key: str, name: str) -> None:
    with Session(engine) as s, s.begin():
        box.publish(s, topic="t", key=key, type=name, payload={})


def _types(publisher: InMemoryPublisher, key: str) -> list[str]:
    return [dict(r.headers)["ce_type"].decode() for r in publisher.records
            if r.key == key.encode()]


@pytest.fixture
def relay(db_url: str) -> Iterator[tuple[Relay, InMemoryPublisher]]:
    publisher = InMemoryPublisher()
    r = Relay(RelayConfig(db_url=db_url, batch_size=SHARDS), lambda: publisher)
    try:
        yield r, publisher
    finally:
        r.stop()
        r._close()


def _run_until_idle(relay: Relay) -> None:
    while relay.step(wait=False):
        pass


def test_a_late_commit_below_the_cursor_is_sent_before_its_keys_next_event(
    engine: sa.Engine, relay: tuple[Relay, InMemoryPublisher]
) -> None:
    r, publisher = relay
    box = Outbox()
    key, other = "late-key", _same_shard("late-key")
    _run_until_idle(r)  # connected, every shard owned
    claims: list[bool] = []
    claim = Store.claim

    def spy(self: Store, *args: object, **kwargs: object) -> object:
        got = claim(self, *args, **kwargs)  # type: ignore[arg-type]
        claims.append(got.from_cursor)
        return got

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Store, "claim", spy)
        with _Paused(engine, box, key, "first"):
            _publish(engine, box, other, "x")  # a higher position, committed first
            _run_until_idle(r)  # sent and acknowledged: the cursor passes the late one
            assert _types(publisher, other) == ["x"] and _types(publisher, key) == []
            assert claims and all(claims), "the claims went past the cursors"
        _publish(engine, box, key, "second")  # drawn only after "first" committed
        _run_until_idle(r)
    assert _types(publisher, key) == ["first", "second"]
    assert claims[-2] is False or claims[-1] is False, "no claim went back to the start"


def test_the_pipelined_claim_never_passes_a_late_commit(
    engine: sa.Engine, relay: tuple[Relay, InMemoryPublisher]
) -> None:
    """The second claim of a round, made while the first batch is in flight, claims
    nothing once a transaction in progress at the first claim has ended."""
    r, publisher = relay
    box = Outbox()
    key = "late-key"
    other = _same_shard(key)
    _run_until_idle(r)
    with _Paused(engine, box, key, "first") as late:
        for i in range(3):  # the shard's slice is 1 event: a full slice, so it pipelines
            _publish(engine, box, other, f"x{i}")
        store_next = Store.claim_next

        def commit_late_first(self: Store, *args: object, **kwargs: object) -> object:
            late.go.set()  # the late transaction commits between the two claims
            late._thread.join(30)
            _publish(engine, box, key, "second")
            return store_next(self, *args, **kwargs)  # type: ignore[arg-type]

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Store, "claim_next", commit_late_first)
            r.step(wait=False)
    _run_until_idle(r)
    assert _types(publisher, key) == ["first", "second"]
    assert _types(publisher, other) == ["x0", "x1", "x2"]


def test_each_pipelined_claim_is_checked_against_the_claim_before_it(
    engine: sa.Engine, relay: tuple[Relay, InMemoryPublisher]
) -> None:
    """A transaction that begins after a round's first claim, draws a position and
    commits while the round goes on is not in the first claim's snapshot: the round's
    third claim must be checked against the second's, which saw it in progress, or the
    cursor would pass its event for good."""
    r, publisher = relay
    box = Outbox()
    key = "late-key"
    other = _same_shard(key)
    _run_until_idle(r)
    _publish(engine, box, other, "x0")  # the first claim's slice (one event per shard)
    send_next = Store.claim_next
    calls: list[int] = []
    late: list[_Paused] = []

    def during_the_round(self: Store, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:  # before the second claim: begins after the first one's snapshot
            late.append(_Paused(engine, box, key, "first").__enter__())
            _publish(engine, box, other, "y1")  # past its position, visible: claimed next
            _publish(engine, box, other, "y2")
        elif len(calls) == 2:  # before the third claim: it commits
            late[0].__exit__()
        return send_next(self, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Store, "claim_next", during_the_round)
        r.step(wait=False)
    assert len(calls) >= 2, "the round did not pipeline a third claim"
    _publish(engine, box, key, "second")
    _run_until_idle(r)
    assert _types(publisher, key) == ["first", "second"]
    assert _types(publisher, other) == ["x0", "y1", "y2"]
