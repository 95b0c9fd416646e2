"""Write-path overhead: business transactions/s with one domain insert, without and with
one published event (and with a NOTIFY on every commit), 8 concurrent writers, same run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.common import Result, drop_database, fresh_database
from outbox import Outbox

WRITERS = 8
SECONDS = 6.0


def _rate(factory: sessionmaker[Session], body: Callable[[Session, int], None]) -> float:
    stop = threading.Event()
    counts = [0] * WRITERS

    def work(i: int) -> None:
        n = 0
        while not stop.is_set():
            with factory() as s, s.begin():
                body(s, i * 10_000_000 + n)
            n += 1
        counts[i] = n

    threads = [threading.Thread(target=work, args=(i,)) for i in range(WRITERS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def run(db_url: str, kafka: str) -> list[Result]:
    url = fresh_database(db_url)
    engine = sa.create_engine(url, pool_size=WRITERS)
    try:
        with engine.begin() as c:
            c.execute(sa.text("CREATE TABLE orders (id bigint primary key, amount int)"))
            # A relay that sleeps asks for NOTIFY; "auto" writers then send it.
            c.execute(sa.text("INSERT INTO outbox_shards (shard, relay_waiting) "
                              "SELECT g, false FROM generate_series(0, 15) g"))
        factory = sessionmaker(engine)
        insert = sa.text("INSERT INTO orders VALUES (:id, 1)")

        def plain(s: Session, n: int) -> None:
            s.execute(insert, {"id": n})

        def with_event(box: Outbox) -> Callable[[Session, int], None]:
            def body(s: Session, n: int) -> None:
                s.execute(insert, {"id": n})
                box.publish(s, topic="orders", key=f"c{n % 1000}", type="OrderPlaced",
                            payload={"id": n, "amount": 1})
            return body

        def truncate() -> None:
            with engine.begin() as c:
                c.execute(sa.text("TRUNCATE orders, outbox_events"))

        base = _rate(factory, plain)
        truncate()
        auto = _rate(factory, with_event(Outbox(notify="auto")))
        truncate()
        always = _rate(factory, with_event(Outbox(notify="always")))
        truncate()
        base2 = _rate(factory, plain)  # the ceiling again: drift shows up here
        ceiling = (base + base2) / 2
    finally:
        engine.dispose()
        drop_database(db_url, url)
    return [
        Result("write: no outbox (ceiling, 2 runs averaged)", ceiling, "tx/s",
               note=f"runs {base:.0f} and {base2:.0f}"),
        Result("write: + 1 event, NOTIFY only when a relay sleeps", auto, "tx/s",
               "no outbox", ceiling, note="relay busy: no NOTIFY sent"),
        Result("write: + 1 event, NOTIFY on every commit", always, "tx/s",
               "no outbox", ceiling),
    ]
