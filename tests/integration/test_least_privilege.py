"""The relay, the consumer and the writer run under roles that can touch only their tables.

The GRANTs here are the ones docs/production.md shows ("Least privilege"); a unit test
(tests/unit/test_readme.py) keeps the two the same.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox import Event, IdempotentConsumer, Outbox
from outbox.consumer import ConsumerRunner
from outbox.dburl import libpq_url
from outbox.publisher import KafkaPublisher, KafkaSettings
from outbox.reclaim import Reclaimer
from outbox.schema import make_tables
from outbox.testing import drain

GRANTS = """
GRANT INSERT ON outbox_events TO {writer};
GRANT USAGE ON SEQUENCE outbox_events_position_seq TO {writer};
GRANT SELECT ON outbox_shards TO {writer};
GRANT SELECT, INSERT, UPDATE ON orders TO {writer};
GRANT USAGE ON SEQUENCE orders_id_seq TO {writer};

GRANT SELECT, UPDATE, DELETE, TRUNCATE ON outbox_events TO {relay};
GRANT SELECT, INSERT ON outbox_dead_letters TO {relay};
GRANT SELECT, UPDATE ON outbox_shards TO {relay};

GRANT SELECT, INSERT, DELETE ON outbox_inbox TO {consumer};
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_attempts TO {consumer};
GRANT SELECT, INSERT, UPDATE ON order_view TO {consumer};
"""


@pytest.fixture
def roles(db_url: str) -> Iterator[dict[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    names = {r: f"outbox_{r}_{suffix}" for r in ("writer", "relay", "consumer")}
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, amount int)")
        conn.execute("CREATE TABLE order_view (id int PRIMARY KEY, amount int)")
        for name in names.values():
            conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'pw'")  # type: ignore[arg-type]
            conn.execute(f"GRANT CONNECT ON DATABASE {make_url(db_url).database} TO {name}")  # type: ignore[arg-type]
        conn.execute(GRANTS.format(**names))  # type: ignore[arg-type]
    urls = {r: make_url(db_url).set(username=n, password="pw").render_as_string(
        hide_password=False) for r, n in names.items()}
    yield urls
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        for name in names.values():
            conn.execute(f"DROP OWNED BY {name}")  # type: ignore[arg-type]
            conn.execute(f"DROP ROLE {name}")  # type: ignore[arg-type]


def test_each_part_runs_with_only_its_grants(
    roles: dict[str, str], kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic()
    box = Outbox()
    writer = sa.create_engine(roles["writer"])
    with Session(writer) as s, s.begin():
        for i in range(20):
            s.execute(sa.text("INSERT INTO orders (amount) VALUES (:a)"), {"a": i})
            box.publish(s, topic=topic, key=f"o{i}", type="OrderPlaced", payload={"id": i})
    writer.dispose()

    publisher = KafkaPublisher(KafkaSettings(kafka_bootstrap))
    try:
        assert drain(roles["relay"], publisher) == 20
    finally:
        publisher.close()
    # an idle relay may give the drained table's storage back (outbox.reclaim)
    with psycopg.connect(libpq_url(roles["relay"]), autocommit=True) as conn:
        assert Reclaimer(make_tables(), above_bytes=1).truncate_if_empty(conn) is not None

    class View(IdempotentConsumer):
        topics = [topic]
        group_id = f"view-{uuid.uuid4().hex[:6]}"

        def handle(self, event: Event, session: Session) -> None:
            session.execute(sa.text("INSERT INTO order_view VALUES (:i, :i)"),
                            {"i": event.payload["id"]})

    runner = ConsumerRunner(View(), db_url=roles["consumer"], kafka=kafka_bootstrap)
    deadline = time.monotonic() + 60
    try:
        done = 0
        while done < 20 and time.monotonic() < deadline:
            done += runner.run_once(timeout=1.0)
    finally:
        runner.close()
    assert done == 20

    # and nothing more: the relay's role cannot read the application's tables
    relay = sa.create_engine(roles["relay"])
    with relay.connect() as c, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
        c.execute(sa.text("SELECT * FROM orders"))
    relay.dispose()
