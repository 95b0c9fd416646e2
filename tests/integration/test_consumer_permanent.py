"""Permanent misconfiguration is not an outage: the consumer stops with the reason.

Missing tables or a wrong password never heal by waiting; the runner used to report
them as "database unavailable" and retry forever. Now `run()` raises ConfigError with
the reason (outbox.diagnose.permanent_reason), and `outbox consume` exits non-zero.
A database that is merely down is still retried (test_consumer.py covers a lost
connection).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from outbox.consumer import ConsumerRunner
from outbox.errors import ConfigError
from tests.integration.conftest import _admin_exec
from tests.integration.test_consumer import (
    CounterConsumer,
    client,  # noqa: F401  (fixture)
    counter_table,  # noqa: F401  (fixture)
    make_events,
    produce_events,
    run_until,
)


@pytest.fixture
def bare_db_url(admin_url: str) -> Iterator[str]:
    """A database without the outbox tables (never migrated)."""
    name = f"outbox_bare_{uuid.uuid4().hex[:10]}"
    _admin_exec(admin_url, f'CREATE DATABASE "{name}"')
    yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    _admin_exec(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_to_the_end(runner: ConsumerRunner, timeout: float = 30) -> BaseException | None:
    """run() in a thread; what it raised, or None. Fails if it is still running."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            runner.run()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        runner.stop()
        thread.join(15)
        pytest.fail(f"run() still retrying after {timeout}s instead of stopping")
    return raised[0] if raised else None


def test_missing_tables_stop_the_consumer_with_the_reason(
    bare_db_url: str, kafka_bootstrap: str, new_topic: Callable[..., str],
    client: str,  # noqa: F811
) -> None:
    topic = new_topic(1)
    produce_events(kafka_bootstrap, topic, make_events(topic, 5, keys=1))
    runner = ConsumerRunner(CounterConsumer(topic, "bare"), db_url=bare_db_url,
                            kafka=kafka_bootstrap, session_timeout_ms=6000, client=client)
    exc = run_to_the_end(runner)
    assert isinstance(exc, ConfigError), exc
    assert "the outbox tables are missing" in str(exc) and "outbox db upgrade" in str(exc)
    assert runner.source is None and runner.dead_letters.publisher is None  # closed


def test_a_wrong_password_stops_the_consumer_with_the_reason(
    db_url: str, kafka_bootstrap: str, new_topic: Callable[..., str],
    client: str,  # noqa: F811
) -> None:
    wrong = make_url(db_url).set(password="not-the-password").render_as_string(
        hide_password=False)
    runner = ConsumerRunner(CounterConsumer(new_topic(1), "pw"), db_url=wrong,
                            kafka=kafka_bootstrap, session_timeout_ms=6000, client=client)
    exc = run_to_the_end(runner)
    assert isinstance(exc, ConfigError), exc
    assert "authentication failed" in str(exc)
    assert "not-the-password" not in str(exc)


def test_tables_dropped_while_running_stop_the_batch_loop_with_the_reason(
    counter_table: sa.Engine, db_url: str, kafka_bootstrap: str,  # noqa: F811
    new_topic: Callable[..., str], client: str,  # noqa: F811
) -> None:
    topic = new_topic(1)
    produce_events(kafka_bootstrap, topic, make_events(topic, 5, keys=1))
    runner = ConsumerRunner(CounterConsumer(topic, "dropped"), db_url=db_url,
                            kafka=kafka_bootstrap, session_timeout_ms=6000, client=client)
    try:
        run_until(runner, lambda: runner.stats.processed == 5, "5 events applied")
    except BaseException:
        runner.close()
        raise
    with counter_table.begin() as c:
        c.execute(sa.text("DROP TABLE outbox_inbox"))
    produce_events(kafka_bootstrap, topic, make_events(topic, 5, keys=1, start=5))
    exc = run_to_the_end(runner)  # the purge is not due: the batch meets the missing table
    assert isinstance(exc, ConfigError), exc
    assert "the outbox tables are missing" in str(exc)
    assert "outbox_inbox" in str(exc)
