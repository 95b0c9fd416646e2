"""Write-path overhead: transactions/s of 8 concurrent writers, without and with one
published event, for two transactions, in the same run:

- minimal: one INSERT (the worst case for the outbox: the event doubles the writes);
- typical: the usual business transaction, 1 SELECT, 1 INSERT and 2 UPDATEs on indexed
  tables (read a customer by primary key, insert an order, debit the customer, take a
  product from stock).

Each no-outbox rate (the ceiling) is measured before and after its with-event run and
averaged, so drift shows in the note. No relay runs: every shard is marked busy, so
`notify="auto"` writers send no NOTIFY; one more run shows the cost of a NOTIFY on
every commit (`notify="always"`).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.common import Result, database, seconds
from outbox import Outbox

WRITERS = 8
GC_TUNED = False  # the writers are application code: the interpreter's collector settings
SECONDS = seconds(6.0)
CUSTOMERS = 10_000
PRODUCTS = 1_000
Body = Callable[[Session, int, random.Random], None]

SCHEMA = [
    "CREATE TABLE orders_min (id bigint PRIMARY KEY, amount int NOT NULL)",
    "CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, balance bigint NOT NULL)",
    "CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, stock int NOT NULL)",
    "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int NOT NULL "
    "REFERENCES customers, product_id int NOT NULL REFERENCES products, amount int NOT NULL, "
    "created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE INDEX ix_orders_customer ON orders (customer_id)",
    f"INSERT INTO customers SELECT g, 'customer ' || g, 1000000 "
    f"FROM generate_series(0, {CUSTOMERS - 1}) g",
    f"INSERT INTO products SELECT g, 'product ' || g, 1000000 "
    f"FROM generate_series(0, {PRODUCTS - 1}) g",
    # A relay that sleeps asks for NOTIFY: none sleeps, so "auto" writers send none.
    "UPDATE outbox_shards SET relay_waiting = false",
    "ANALYZE",
]
_MIN_INSERT = sa.text("INSERT INTO orders_min VALUES (:id, 42)")
_SELECT = sa.text("SELECT id, balance FROM customers WHERE id = :c")
_INSERT = sa.text("INSERT INTO orders (id, customer_id, product_id, amount) "
                  "VALUES (:id, :c, :p, 42)")
_DEBIT = sa.text("UPDATE customers SET balance = balance - 42 WHERE id = :c")
_STOCK = sa.text("UPDATE products SET stock = stock - 1 WHERE id = :p")


def minimal(s: Session, n: int, rnd: random.Random) -> int:
    s.execute(_MIN_INSERT, {"id": n})
    return rnd.randrange(CUSTOMERS)


def typical(s: Session, n: int, rnd: random.Random) -> int:
    c, p = rnd.randrange(CUSTOMERS), rnd.randrange(PRODUCTS)
    s.execute(_SELECT, {"c": c}).one()
    s.execute(_INSERT, {"id": n, "c": c, "p": p})
    s.execute(_DEBIT, {"c": c})
    s.execute(_STOCK, {"p": p})
    return c


def with_event(box: Outbox, body: Callable[[Session, int, random.Random], int]) -> Body:
    def run(s: Session, n: int, rnd: random.Random) -> None:
        c = body(s, n, rnd)
        box.publish(s, topic="orders", key=f"customer-{c}", type="OrderPlaced",
                    payload={"id": n, "amount": 42, "currency": "EUR"})
    return run


def _rate(factory: sessionmaker[Session], body: Body) -> float:
    stop = threading.Event()
    counts = [0] * WRITERS

    def work(i: int) -> None:
        rnd = random.Random(i)
        n = 0
        while not stop.is_set():
            with factory() as s, s.begin():
                body(s, i * 100_000_000 + n, rnd)
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
    results: list[Result] = []
    with database(db_url) as url:
        engine = sa.create_engine(url, pool_size=WRITERS)
        try:
            with engine.begin() as c:
                for statement in SCHEMA:
                    c.execute(sa.text(statement))
            factory = sessionmaker(engine)

            def measure(body: Body) -> float:
                rate = _rate(factory, body)
                with engine.begin() as c:
                    c.execute(sa.text("TRUNCATE orders_min, orders, outbox_events"))
                return rate

            auto, always = Outbox(notify="auto"), Outbox(notify="always")
            for name, shape, body, target in (
                    ("minimal tx", "1 INSERT", minimal, 0.75),
                    ("typical tx", "1 SELECT, 1 INSERT, 2 UPDATE", typical, 0.9)):
                def plain(s: Session, n: int, rnd: random.Random,
                          body: Callable[[Session, int, random.Random], int] = body) -> None:
                    body(s, n, rnd)

                base = measure(plain)
                event = measure(with_event(auto, body))
                notify = measure(with_event(always, body)) if body is minimal else None
                base2 = measure(plain)
                ceiling = (base + base2) / 2
                results.append(Result(f"{name}, no outbox", ceiling, "tx/s",
                                      note=f"{shape}; {WRITERS} writers; runs {base:,.0f} "
                                      f"and {base2:,.0f} averaged"))
                results.append(Result(f"{name} + 1 event", event, "tx/s",
                                      "no outbox", ceiling, target=(">=", target),
                                      note=f"{shape}; no NOTIFY (no relay sleeps)"))
                if notify is not None:
                    results.append(Result(f"{name} + 1 event + NOTIFY", notify,
                                          "tx/s", "no outbox", ceiling,
                                          note=f"{shape}; notify='always': NOTIFY every "
                                          "commit"))
        finally:
            engine.dispose()
    return results
