"""The system under test in the chaos run: writers using the decorator, and an idempotent
consumer whose effect is a counter per event id.

    python -m tests.chaos.app writer --db URL --topic T   (until SIGTERM)
    outbox consume tests.chaos.app:Effects ...            (CHAOS_TOPIC, CHAOS_GROUP)
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import threading
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from outbox import Event, IdempotentConsumer, Outbox
from outbox.backoff import Throttled

DDL = [
    # the per-key version counter writers bump: its row lock makes versions commit order
    "CREATE TABLE chaos_versions (key text PRIMARY KEY, version int NOT NULL)",
    # which event carries which version; a row exists iff the writer's transaction committed
    "CREATE TABLE chaos_events (event_id uuid PRIMARY KEY, key text NOT NULL, "
    "version int NOT NULL)",
    # the consumer's effect: how often each event was applied
    "CREATE TABLE chaos_effects (event_id uuid PRIMARY KEY, n int NOT NULL)",
]

log = logging.getLogger("chaos.writer")


class Effects(IdempotentConsumer):
    topics = [os.environ.get("CHAOS_TOPIC", "chaos")]
    group_id = os.environ.get("CHAOS_GROUP", "chaos-effects")

    def handle(self, event: Event, session: Session) -> None:
        session.execute(sa.text(
            "INSERT INTO chaos_effects VALUES (:id, 1) "
            "ON CONFLICT (event_id) DO UPDATE SET n = chaos_effects.n + 1"), {"id": event.id})


class RollBack(Exception):
    """Raised on purpose after publishing: the event must never be seen."""


def bump(session: Session, key: str) -> int:
    """The key's next version; the row lock it takes makes versions follow commit order."""
    return int(session.execute(sa.text(
        "INSERT INTO chaos_versions VALUES (:k, 1) ON CONFLICT (key) DO UPDATE "
        "SET version = chaos_versions.version + 1 RETURNING version"), {"k": key}).scalar_one())


def record(session: Session, event: Event, version: int) -> None:
    """What the checker compares Kafka with: this event carries this version of its key."""
    session.execute(sa.text("INSERT INTO chaos_events VALUES (:e, :k, :v)"),
                    {"e": event.id, "k": event.key, "v": version})


def race(factory: sessionmaker[Session], box: Outbox, topic: str, key: str,
         timeout: float = 10.0) -> bool:
    """Two transactions on one key, where the one that publishes first commits last.

    The first publishes, then waits; the second bumps the version, publishes and commits;
    then the first bumps and commits. Versions follow commit order (the row lock), so the
    first's event must reach Kafka after the second's. An outbox that fixes an event's
    place when `publish()` is called, not when its transaction commits, puts it first:
    with relays held back until both have committed, that is an order violation every
    time. True when both committed.
    """
    published, go = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def first() -> None:
        try:
            with factory() as session, session.begin():
                event = box.publish(session, topic=topic, key=key, type="Bumped",
                                    payload={"k": key, "race": "first"})
                published.set()
                if not go.wait(timeout):
                    raise TimeoutError("the second transaction did not finish")
                record(session, event, bump(session, key))
            outcome["first"] = True
        except Exception as exc:  # reported to the caller, which counts a miss
            outcome["first"] = exc
        finally:
            published.set()

    thread = threading.Thread(target=first, daemon=True, name=f"race-{key}")
    thread.start()
    try:
        if not published.wait(timeout) or "first" in outcome:
            return False
        with factory() as session, session.begin():
            version = bump(session, key)
            record(session, box.publish(session, topic=topic, key=key, type="Bumped",
                                        payload={"k": key, "v": version}), version)
    finally:
        go.set()
        thread.join(timeout + 5)
    return outcome.get("first") is True


def probe(factory: sessionmaker[Session], box: Outbox, topic: str, keys: list[str]) -> None:
    """One transaction with an event on each key (recorded like any writer's): every relay
    that owns one of their shards has something to send right away."""
    with factory() as session, session.begin():
        for key in keys:
            version = bump(session, key)
            record(session, box.publish(session, topic=topic, key=key, type="Bumped",
                                        payload={"k": key, "v": version, "probe": True}),
                   version)


def writer(db_url: str, topic: str, keys: int, threads: int, rate: float, seed: int) -> None:
    engine = sa.create_engine(db_url, pool_size=threads, pool_pre_ping=True,
                              connect_args={"connect_timeout": 5})
    factory = sessionmaker(engine)
    box = Outbox()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    throttle = Throttled(log)

    @box.transactional(factory)
    def write(session: Session, key: str, publish_first: bool, rollback: bool) -> None:
        if publish_first:
            event = box.publish(session, topic=topic, key=key, type="Bumped", payload={"k": key})
            version = bump(session, key)
        else:
            version = bump(session, key)
            event = box.publish(session, topic=topic, key=key, type="Bumped",
                                payload={"k": key, "v": version})
        record(session, event, version)
        if rollback:
            raise RollBack

    def work(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        pause = threads / rate
        while not stop.is_set():
            try:
                write(f"key-{rng.randrange(keys)}", rng.random() < 0.5, rng.random() < 0.1)
                throttle.recovered("db", "writer: database reachable again")
            except RollBack:
                pass
            except sa.exc.DBAPIError as exc:
                throttle.warn("db", f"writer: {type(exc.orig).__name__}; retrying")
                stop.wait(0.3)
            stop.wait(pause * rng.uniform(0.5, 1.5))

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    engine.dispose()


def main() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["writer"])
    parser.add_argument("--db", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--keys", type=int, default=40)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rate", type=float, default=60.0, help="transactions/s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.monotonic()
    writer(args.db, args.topic, args.keys, args.threads, args.rate, args.seed)
    log.info("writer stopped after %.0fs", time.monotonic() - started)


if __name__ == "__main__":
    main()
