"""Fixtures on the real PostgreSQL and Kafka that `scripts/stack up` provides.

A template database is migrated once per run and cloned per test (as Procrastinate
does); each test gets its own Kafka topics. Missing servers fail the run loudly:
an integration test that skipped would be counted as passing.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
import sqlalchemy as sa
from kafka.admin import KafkaAdminClient, NewTopic
from sqlalchemy.engine import make_url

from outbox import migrate
from outbox.dburl import libpq_url, sqlalchemy_url

TEMPLATE = f"outbox_tpl_{os.getpid()}"


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: integration tests need the real servers. "
            "Run them with `make test` (which runs `scripts/stack up`), or "
            "`eval \"$(scripts/stack env)\"` first.",
            pytrace=False,
        )
    return value


@pytest.fixture(scope="session")
def admin_url() -> str:
    return sqlalchemy_url(_required("OUTBOX_DATABASE_URL"))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return _required("OUTBOX_KAFKA_BOOTSTRAP_SERVERS")


def _admin_exec(admin_url: str, sql: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def template_db(admin_url: str) -> Iterator[str]:
    _admin_exec(admin_url, f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
    _admin_exec(admin_url, f'CREATE DATABASE "{TEMPLATE}"')
    url = make_url(admin_url).set(database=TEMPLATE).render_as_string(hide_password=False)
    migrate.upgrade(url)
    yield TEMPLATE
    _admin_exec(admin_url, f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')


@pytest.fixture
def db_url(admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh database with the outbox tables, cloned from the migrated template."""
    name = f"outbox_t_{uuid.uuid4().hex[:12]}"
    _admin_exec(admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    _admin_exec(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(db_url, pool_size=10, max_overflow=10)
    yield eng
    eng.dispose()


@pytest.fixture
def new_topic(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """Make a topic unique to this test (3 partitions by default)."""
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="outbox-tests")
    made: list[str] = []

    def make(partitions: int = 3, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        made.append(name)
        return name

    yield make
    if made:
        with contextlib.suppress(Exception):
            admin.delete_topics(made)
    admin.close()
