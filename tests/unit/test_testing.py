"""outbox.testing on SQLite: drain() is the relay there, keeping each shard's order."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.publisher import InMemoryPublisher, Record
from outbox.schema import make_tables
from outbox.testing import drain


def test_drain_publishes_everything_in_key_order_and_empties_the_outbox(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    engine = sa.create_engine(url)
    make_tables().metadata.create_all(engine)
    box = Outbox()
    for i in range(30):
        with Session(engine) as s, s.begin():
            box.publish(s, topic="t", key=f"k{i % 3}", type="T", payload={"i": i})
    calls = {"n": 0}

    def flaky(record: Record) -> BaseException | None:
        calls["n"] += 1
        return ConnectionError("blip") if calls["n"] in (5, 6) else None

    publisher = InMemoryPublisher(fail=flaky)
    assert drain(url, publisher) == 30
    per_key: dict[bytes, list[int]] = {}
    for r in publisher.records:
        i = int(r.value.decode().split(":")[1].rstrip("}"))
        if i not in per_key.setdefault(r.key, []):
            per_key[r.key].append(i)
    assert all(v == sorted(v) and len(v) == 10 for v in per_key.values())
    with engine.connect() as c:
        assert c.scalar(sa.select(sa.func.count()).select_from(make_tables().events)) == 0
