"""What every benchmark reports: a rate, the ceiling it is compared to, and their ratio."""

from __future__ import annotations

import os
import platform
import uuid
from dataclasses import asdict, dataclass

import psycopg
from sqlalchemy.engine import make_url

from outbox import migrate
from outbox.dburl import libpq_url, sqlalchemy_url


@dataclass
class Result:
    name: str
    value: float
    unit: str
    ceiling_name: str | None = None
    ceiling: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.ceiling:
            return None
        return self.value / self.ceiling

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ratio": self.ratio}


def machine() -> str:
    return (f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
            f"Python {platform.python_version()}")


def env() -> tuple[str, str]:
    db = os.environ.get("OUTBOX_DATABASE_URL")
    kafka = os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS")
    if not db or not kafka:
        raise SystemExit("set OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP_SERVERS "
                         "(make bench does: scripts/stack up; eval \"$(scripts/stack env)\")")
    return sqlalchemy_url(db), kafka


def fresh_database(admin_url: str, name: str | None = None) -> str:
    """A new, migrated database for one benchmark (dropped and made again)."""
    name = name or f"outbox_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    return url


def drop_database(admin_url: str, url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
