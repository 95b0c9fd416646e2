"""permanent_reason: what cannot heal by waiting is named; outages are left to backoff."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa
from kafka.errors import KafkaConfigurationError, KafkaConnectionError, KafkaTimeoutError

from outbox.diagnose import permanent_reason
from outbox.errors import ConfigError

AUTH = ('connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        'FATAL:  password authentication failed for user "app"')
NO_DB = ('connection failed: connection to server at "127.0.0.1", port 5432 failed: '
         'FATAL:  database "shop" does not exist')
REFUSED = ('connection failed: connection to server at "127.0.0.1", port 1 failed: '
           "Connection refused\n\tIs the server running on that host and accepting TCP/IP?")


def wrapped(orig: BaseException) -> sa.exc.DBAPIError:
    """As SQLAlchemy raises a driver error."""
    return sa.exc.OperationalError("SELECT 1", {}, orig)


def caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(("exc", "expected"), [
    (psycopg.errors.UndefinedTable('relation "outbox_events" does not exist\nLINE 1: ...'),
     'the outbox tables are missing (relation "outbox_events" does not exist): '
     "run `outbox db upgrade`"),
    (psycopg.OperationalError(AUTH),
     'database authentication failed (password authentication failed for user "app")'),
    (wrapped(psycopg.OperationalError(AUTH)), "database authentication failed"),
    (psycopg.OperationalError(NO_DB), 'the database does not exist (database "shop" does not'),
    (psycopg.errors.InsufficientPrivilege("permission denied for table outbox_events"),
     "permission denied (permission denied for table outbox_events)"),
    (RuntimeError("Libraries for lz4 compression codec not found"),
     "compression 'lz4' needs the Python package 'lz4'"),
    (caused(RuntimeError("Kafka unavailable"),
            RuntimeError("Libraries for snappy compression codec not found")),
     "pip install python-snappy"),
    (ValueError("Unrecognized configs: {'sasl_pasword': 'hunter2'}"),
     "the Kafka client does not know the option(s) sasl_pasword"),
    (KafkaConfigurationError("acks must be all for idempotence"),
     "the Kafka client configuration is contradictory"),
    (ConfigError("invalid table prefix 'x-y'"), "invalid table prefix 'x-y'"),
])
def test_permanent_conditions_are_named(exc: BaseException, expected: str) -> None:
    reason = permanent_reason(exc)
    assert reason is not None and expected in reason


@pytest.mark.parametrize("exc", [
    psycopg.OperationalError(REFUSED),
    wrapped(psycopg.OperationalError(REFUSED)),
    psycopg.OperationalError("failed to resolve host 'db': [Errno -3] Temporary failure"),
    psycopg.OperationalError("consuming input failed: server closed the connection"),
    psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
    psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
    KafkaConnectionError("111 ECONNREFUSED"),
    KafkaTimeoutError("Unable to bootstrap from ['127.0.0.1:9092']"),
    TimeoutError(),
    ValueError("some other value error"),
])
def test_outages_and_unknown_errors_are_left_to_backoff(exc: BaseException) -> None:
    assert permanent_reason(exc) is None


def test_option_values_are_never_shown() -> None:
    reason = permanent_reason(ValueError("Unrecognized configs: {'sasl_pasword': 'hunter2'}"))
    assert reason is not None and "hunter2" not in reason


def test_a_cycle_of_causes_ends() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert permanent_reason(a) is None
