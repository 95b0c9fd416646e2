"""The `outbox` command against the real database: status, dead letters, errors, masking."""

from __future__ import annotations

import os
import subprocess
import sys

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.publisher import InMemoryPublisher
from outbox.schema import tables
from outbox.testing import drain


def outbox_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "outbox.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_status_shows_backlog_and_dead_letters(engine: sa.Engine, db_url: str) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        for i in range(5):
            box.publish(s, topic="t", key=f"k{i}", type="T", payload={"i": i})
    out = outbox_cli("status", "--db", db_url)
    assert out.returncode == 0, out.stderr
    assert "pending events: 5" in out.stdout and "dead letters: 0" in out.stdout
    assert "live relays: 0" in out.stdout


def test_dead_letters_list_retry_and_purge(engine: sa.Engine, db_url: str) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        poison = box.publish(s, topic="t", key="a", type="Poison", payload={})
        box.publish(s, topic="t", key="b", type="Fine", payload={})
    refused = InMemoryPublisher(
        fail=lambda r: MessageSizeTooLargeError("too big") if b"Poison" in dict(
            r.headers)["ce_type"] else None)
    drain(db_url, refused)
    assert [r.headers[2][1] for r in refused.records] == [b"Fine"]

    listed = outbox_cli("dead-letters", "list", "--db", db_url)
    assert str(poison.id) in listed.stdout and "MessageSizeTooLargeError" in listed.stdout

    assert "retried 1" in outbox_cli("dead-letters", "retry", "--all", "--db", db_url).stdout
    ok = InMemoryPublisher()
    drain(db_url, ok)
    assert ok.event_ids() == [str(poison.id)]
    with engine.connect() as c:
        assert c.scalar(sa.select(sa.func.count()).select_from(tables.dead_letters)) == 0

    with Session(engine) as s, s.begin():
        box.publish(s, topic="t", key="a", type="Poison", payload={})
    drain(db_url, refused)
    assert "purged 1" in outbox_cli("dead-letters", "purge", "--all", "--db", db_url).stdout
    usage = outbox_cli("dead-letters", "purge", "--db", db_url)
    assert usage.returncode == 2 and "pass --all" in usage.stderr


def test_unreachable_database_gives_a_clear_error_with_the_password_masked() -> None:
    url = "postgresql://outbox:s3cret-pw@127.0.0.1:1/nowhere"
    out = outbox_cli("status", "--db", url)
    assert out.returncode == 1
    assert "cannot read postgresql://outbox:***@127.0.0.1:1/nowhere" in out.stderr
    assert "s3cret-pw" not in out.stderr + out.stdout


def test_every_flag_reads_its_environment_variable(db_url: str) -> None:
    out = outbox_cli("status", env={"OUTBOX_DATABASE_URL": db_url})
    assert out.returncode == 0 and "pending events: 0" in out.stdout


class MessageSizeTooLargeError(Exception):
    """Named like kafka-python's: the relay treats it as a permanent refusal."""
