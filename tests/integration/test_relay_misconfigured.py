"""A relay that cannot work until someone fixes its configuration stops and says why;
it does not report an outage and retry forever."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from outbox import ConfigError
from outbox.dburl import libpq_url
from outbox.publisher import InMemoryPublisher
from outbox.relay import Relay, RelayConfig


@pytest.fixture
def unmigrated_url(admin_url: str) -> Iterator[str]:
    name = f"outbox_u_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def _run_briefly(relay: Relay) -> BaseException | None:
    """Run the relay's loop; what it raised, or None if it was still retrying after 10 s."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            relay.run()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        relay.stop()
        thread.join(15)
    return raised[0] if raised else None


def test_missing_tables_stop_the_relay_with_the_fix(unmigrated_url: str) -> None:
    error = _run_briefly(Relay(RelayConfig(db_url=unmigrated_url), InMemoryPublisher))
    assert isinstance(error, ConfigError), error
    assert "outbox db upgrade" in str(error)


def test_a_wrong_password_stops_the_relay(db_url: str) -> None:
    url = make_url(db_url).set(password="not-the-password")
    error = _run_briefly(Relay(RelayConfig(
        db_url=url.render_as_string(hide_password=False)), InMemoryPublisher))
    assert isinstance(error, ConfigError), error
    assert "authentication failed" in str(error) and "not-the-password" not in str(error)


def test_a_database_that_is_down_is_retried_not_fatal() -> None:
    relay = Relay(RelayConfig(db_url="postgresql://outbox:outbox@127.0.0.1:1/outbox"),
                  InMemoryPublisher)
    assert _run_briefly(relay) is None  # still retrying with backoff when stopped
