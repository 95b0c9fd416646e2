"""Conditions a user can cause end an `outbox` command with one clear line, never a traceback.

Each test runs the real command in a subprocess and checks the exit code, a specific
message and that no Python traceback was printed. Permanent misconfiguration (no
tables, wrong password, no such database, a missing compression library) stops a relay
or consumer at once; an unreachable server at startup is retried, and the log says why.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.dburl import libpq_url

ROOT = Path(__file__).resolve().parents[2]
CONSUMER = "tests.integration.consumer_app:Counter"
UNREACHABLE = "postgresql://outbox:s3cret-pw@127.0.0.1:1/nowhere"


def outbox_cli(*args: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "outbox.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def assert_clean_failure(out: subprocess.CompletedProcess[str], code: int, *messages: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == code, text
    for message in messages:
        assert message in text, text
    assert "Traceback" not in text and "Exception ignored" not in text, text


@pytest.fixture
def empty_db_url(admin_url: str) -> Iterator[str]:
    """A database without the outbox tables."""
    name = f"outbox_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- dead letters -----------------------------------------------------------------------

DEAD_LETTER_COMMANDS = [["list"], ["retry", "--all"], ["purge", "--all"]]


@pytest.mark.parametrize("command", DEAD_LETTER_COMMANDS, ids=lambda c: c[0])
def test_dead_letters_on_an_unreachable_database(command: list[str]) -> None:
    out = outbox_cli("dead-letters", *command, "--db", UNREACHABLE)
    assert_clean_failure(out, 1, "dead letters in postgresql://outbox:***@127.0.0.1:1/nowhere",
                         "Connection refused")
    assert "s3cret-pw" not in out.stdout + out.stderr


@pytest.mark.parametrize("command", DEAD_LETTER_COMMANDS, ids=lambda c: c[0])
def test_dead_letters_on_an_unmigrated_database(command: list[str], empty_db_url: str) -> None:
    out = outbox_cli("dead-letters", *command, "--db", empty_db_url)
    assert_clean_failure(out, 1, "the outbox tables are missing", "run `outbox db upgrade`")


# -- URLs -------------------------------------------------------------------------------

SERVICE_ARGS = {
    "status": ["status"],
    "relay": ["relay", "--kafka", "127.0.0.1:9092"],
    "consume": ["consume", CONSUMER, "--kafka", "127.0.0.1:9092"],
}


@pytest.mark.parametrize("command", list(SERVICE_ARGS))
@pytest.mark.parametrize("url", [
    "postgresql://app:p@ss@db.example/shop",
    "postgresql://app:p@ss:wxyz@db.example:5432/shop",
    "db.example:5432/shop",
], ids=["two-at-signs", "at-and-colon", "no-scheme"])
def test_malformed_url_is_refused_without_showing_it(command: str, url: str) -> None:
    out = outbox_cli(*SERVICE_ARGS[command], "--db", url)
    assert_clean_failure(out, 2, "Invalid value for '--db'", "%40")
    text = out.stdout + out.stderr
    assert "ss@db" not in text and "wxyz" not in text and "db.example" not in text


@pytest.mark.parametrize("command", list(SERVICE_ARGS))
def test_sqlite_url_is_refused_where_postgresql_is_needed(command: str, tmp_path: Path) -> None:
    out = outbox_cli(*SERVICE_ARGS[command], "--db", f"sqlite:///{tmp_path}/shop.db")
    assert_clean_failure(out, 2, f"`outbox {command}` needs PostgreSQL", "got a sqlite URL")


def test_password_equal_to_the_prefix_leaves_messages_readable(
    admin_url: str, empty_db_url: str
) -> None:
    """Only the password field is masked: a password that is also a word of the message
    (here the table prefix) neither garbles it nor is searched for in it."""
    role = f"outbox_r_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'shop'")
    try:
        url = make_url(empty_db_url).set(username=role, password="shop")
        out = outbox_cli("status", "--table-prefix", "shop", "--db",
                         url.render_as_string(hide_password=False))
    finally:
        with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {role}")
    assert_clean_failure(out, 1, 'relation "shop_events" does not exist',
                         f"//{role}:***@127.0.0.1")
    assert "***_events" not in out.stderr


def service(command: str, db_url: str, kafka: str) -> list[str]:
    base = {"relay": ["relay"], "consume": ["consume", CONSUMER]}[command]
    return [*base, "--db", db_url, "--kafka", kafka]


# -- metrics ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["relay", "consume"])
def test_metrics_port_in_use(command: str, db_url: str, kafka_bootstrap: str) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        out = outbox_cli(*service(command, db_url, kafka_bootstrap),
                         "--metrics-port", str(port))
    assert_clean_failure(out, 1, f"cannot serve metrics on 127.0.0.1:{port}",
                         "Address already in use")


@pytest.mark.parametrize("command", ["relay", "consume"])
def test_metrics_port_without_the_metrics_extra(command: str, db_url: str,
                                                 kafka_bootstrap: str, tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "prometheus_client.py").write_text(
        "raise ImportError(\"No module named 'prometheus_client' (simulated)\")\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    out = outbox_cli(*service(command, db_url, kafka_bootstrap), "--metrics-port",
                     str(free_port()), env=env)
    assert_clean_failure(out, 1, "--metrics-port needs prometheus-client",
                         "pip install 'transactional-outbox[metrics]'")


# -- settings that contradict each other --------------------------------------------------

@pytest.mark.parametrize(("flags", "message"), [
    (["--poll-interval", "10", "--lease", "10"], "--poll-interval (10 s) must be shorter"),
    (["--poll-interval", "30"], "must be shorter than --lease (10 s)"),
    (["--linger-ms", "5000", "--delivery-timeout-ms", "5500"],
     "--delivery-timeout-ms (5500) must exceed --linger-ms (5000)"),
    (["--kafka-batch-bytes", str(32 * 1024 * 1024)], "must not exceed the producer's largest"),
    (["--exactly-once", "--lease", "3", "--linger-ms", "3000"],
     "--linger-ms (3000) must be shorter than --lease (3 s) with --exactly-once"),
])
def test_contradicting_relay_settings_are_usage_errors(flags: list[str], message: str,
                                                      db_url: str) -> None:
    out = outbox_cli("relay", "--db", db_url, "--kafka", "127.0.0.1:9092", *flags)
    assert_clean_failure(out, 2, message)


# -- permanent misconfiguration stops a service at once -----------------------------------

@pytest.mark.parametrize("command", ["relay", "consume"])
def test_unmigrated_database_stops_the_service(command: str, empty_db_url: str,
                                               kafka_bootstrap: str) -> None:
    out = outbox_cli(*service(command, empty_db_url, kafka_bootstrap), timeout=30)
    assert_clean_failure(out, 1, "cannot start", "the outbox tables are missing",
                         "run `outbox db upgrade`")


@pytest.mark.parametrize("command", ["relay", "consume"])
def test_wrong_password_stops_the_service(command: str, db_url: str,
                                          kafka_bootstrap: str) -> None:
    wrong = make_url(db_url).set(password="not-the-password").render_as_string(
        hide_password=False)
    out = outbox_cli(*service(command, wrong, kafka_bootstrap), timeout=30)
    assert_clean_failure(out, 1, "cannot start", "database authentication failed",
                         "password authentication failed")
    assert "not-the-password" not in out.stdout + out.stderr


@pytest.mark.parametrize("command", ["relay", "consume"])
def test_missing_database_stops_the_service(command: str, db_url: str,
                                            kafka_bootstrap: str) -> None:
    gone = make_url(db_url).set(database="no_such_db_here").render_as_string(
        hide_password=False)
    out = outbox_cli(*service(command, gone, kafka_bootstrap), timeout=30)
    assert_clean_failure(out, 1, "the database does not exist", '"no_such_db_here"')


@pytest.mark.parametrize(("codec", "package"), [("lz4", "lz4"), ("snappy", "python-snappy")])
def test_missing_compression_library_stops_the_relay(codec: str, package: str, db_url: str,
                                                     kafka_bootstrap: str,
                                                     tmp_path: Path) -> None:
    # Whatever is installed here, the relay sees every library kafka-python tries missing.
    shim = tmp_path / "shim"
    shim.mkdir()
    for module in ("lz4", "lz4f", "lz4framed", "snappy"):
        (shim / f"{module}.py").write_text(f"raise ImportError('no {module} (simulated)')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    out = outbox_cli("relay", "--db", db_url, "--kafka", kafka_bootstrap, "--compression",
                     codec, env=env, timeout=30)
    assert_clean_failure(out, 1, f"--compression {codec} needs the Python package",
                         f"pip install {package}")


@pytest.mark.parametrize("command", ["relay", "consume"])
def test_unreachable_database_at_startup_is_retried_and_said_so(
    command: str, kafka_bootstrap: str
) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "outbox.cli",
                             *service(command, UNREACHABLE, kafka_bootstrap)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)
    assert proc.poll() is None, "an unreachable server may be starting: keep retrying"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "unreachable at startup" in err and "may still be starting" in err
    assert "retrying with backoff" in err
    assert "Traceback" not in err and "s3cret-pw" not in err


# -- shutdown -----------------------------------------------------------------------------

def test_relay_stopped_with_sends_in_flight_prints_no_producer_traceback(
    db_url: str, engine: sa.Engine, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """SIGTERM while Kafka does not answer: the producer still holds records. kafka-python's
    close() raises then, and the unclosed producer's __del__ printed a traceback at exit."""
    from tests.chaos.proxy import TcpProxy
    from tests.chaos.run import KAFKA_PROXIED_PORT, KAFKA_PROXY_PORT

    topic, box = new_topic(), Outbox()

    def publish(n: int) -> None:
        with Session(engine) as s, s.begin():
            for i in range(n):
                box.publish(s, topic=topic, key=f"k{i}", type="T", payload={"i": i})

    proxy = TcpProxy(KAFKA_PROXY_PORT, KAFKA_PROXIED_PORT, "kafka")
    try:
        relay = subprocess.Popen(
            [sys.executable, "-m", "outbox.cli", "relay", "--db", db_url, "--kafka",
             f"127.0.0.1:{KAFKA_PROXY_PORT}", "--poll-interval", "0.2"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        publish(10)
        deadline = time.monotonic() + 30
        with engine.connect() as conn:  # delivered: the producer knows the topic now
            while conn.scalar(sa.text("SELECT count(*) FROM outbox_events")) and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
                conn.rollback()
        proxy.blackhole(120)
        publish(10)
        time.sleep(3)  # claimed and sent into the void
        relay.send_signal(signal.SIGTERM)
        _, err = relay.communicate(timeout=90)
    finally:
        proxy.close()
    assert relay.returncode == 0, err
    assert "abandoning" in err, "the test must stop the relay with records in the producer"
    assert "Traceback" not in err and "Exception ignored" not in err, err
