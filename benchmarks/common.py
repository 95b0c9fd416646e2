"""What every benchmark reports (a figure, the ceiling it is compared to, their ratio, the
target the issue set), and what several benchmarks share: the records, a fresh
database, a topic, a backlog filled by COPY, a relay drained to the end."""

from __future__ import annotations

import contextlib
import os
import platform
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from outbox import migrate
from outbox.dburl import libpq_url, sqlalchemy_url
from outbox.event import KafkaHeaders, kafka_headers, uuid7
from outbox.keys import shard_of
from outbox.publisher import KafkaSettings, make_publisher
from outbox.relay import Relay, RelayConfig

#: The records every throughput figure sends: 1,000 keys, a ~40-byte JSON value, the six
#: CloudEvents headers, to a 6-partition topic, with acks=all and idempotence on.
KEYS = 1_000
PARTITIONS = 6
EVENT_TYPE = "OrderPlaced"
SOURCE = "bench"
CONTENT_TYPE = "application/json"


def scale() -> float:
    """BENCH_SCALE (default 1), e.g. 0.02 for a quick check of the benchmarks themselves:
    sizes and durations shrink; the figures are only meaningful at 1."""
    return float(os.environ.get("BENCH_SCALE", "1"))


def sized(n: int) -> int:
    """n events, scaled by BENCH_SCALE (at least 1,000)."""
    return max(1_000, int(n * scale()))


def seconds(s: float) -> float:
    """A measuring time, scaled by BENCH_SCALE (at least 2 s)."""
    return max(2.0, s * scale())


def key(i: int) -> str:
    return f"customer-{i % KEYS}"


def value(i: int) -> bytes:
    return b'{"id":%d,"amount":42,"currency":"EUR"}' % i


def record(i: int, now: datetime) -> tuple[bytes, bytes, KafkaHeaders]:
    """Record i exactly as the relay would send it (key, value, CloudEvents headers)."""
    return key(i).encode(), value(i), kafka_headers(
        event_id=uuid7(), type=EVENT_TYPE, source=SOURCE, occurred_at=now,
        content_type=CONTENT_TYPE, headers={})


@dataclass
class Result:
    """One line of the table. `ratio` is value / ceiling, both measured in the same run.

    `target` is the issue's bar, `(">=", 0.9)`, on the ratio (or on the value when
    there is no ceiling). `samples` (latencies, ms) go to bench.json and the CDF plot.
    """

    name: str
    value: float
    unit: str
    ceiling_name: str | None = None
    ceiling: float | None = None
    note: str = ""
    target: tuple[str, float] | None = None
    samples: list[float] | None = field(default=None, repr=False)
    group: str = ""  # the benchmark that measured it (set by __main__)
    panel: str = ""  # its panel in throughput.png (default: the group's)

    @property
    def ratio(self) -> float | None:
        if not self.ceiling:
            return None
        return self.value / self.ceiling

    @property
    def met(self) -> bool | None:
        """Whether the target is met (None: no target)."""
        if self.target is None:
            return None
        op, bar = self.target
        got = self.ratio if self.ratio is not None else self.value
        return got >= bar if op == ">=" else got <= bar

    def as_dict(self) -> dict[str, object]:
        out = {**asdict(self), "ratio": self.ratio, "met": self.met}
        if self.samples is not None:
            out["samples"] = [round(s, 3) for s in self.samples]
        return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), cpu)
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores, "
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
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    return url


def drop_database(admin_url: str, url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def database(admin_url: str) -> Iterator[str]:
    url = fresh_database(admin_url)
    try:
        yield url
    finally:
        drop_database(admin_url, url)


class Topics:
    """The run's topics: calling it makes one (`new("relay")`: 6 partitions unless told),
    `adopt(name)` takes one something else made (an exactly-once relay's progress
    topic); `topics()` deletes them all at the end. The backlog benchmark writes
    gigabytes, and every partition left behind slows the broker's next start."""

    def __init__(self, admin: Any) -> None:
        self._admin = admin
        self._made: list[str] = []

    def __call__(self, prefix: str, partitions: int = PARTITIONS,
                 config: dict[str, str] | None = None) -> str:
        from kafka.admin import NewTopic

        name = f"bench-{prefix}-{uuid.uuid4().hex[:8]}"
        self._admin.create_topics([NewTopic(name, num_partitions=partitions,
                                            replication_factor=1, topic_configs=config or {})])
        self._made.append(name)
        return name

    def adopt(self, name: str) -> None:
        self._made.append(name)

    def delete(self) -> None:
        """Delete them; one that was never made is fine, any other failure is printed."""
        try:
            result = self._admin.delete_topics(self._made, raise_errors=False)
        except Exception as exc:
            print(f"   could not delete the run's topics: {exc}", flush=True)
            return
        for topic in result.get("topics", []):
            if topic.get("error_code", 0) not in (0, UNKNOWN_TOPIC):
                print(f"   could not delete topic {topic.get('name')}: {topic}", flush=True)


UNKNOWN_TOPIC = 3  # Kafka's UNKNOWN_TOPIC_OR_PARTITION


@contextlib.contextmanager
def topics(kafka: str) -> Iterator[Topics]:
    """The run's Topics, deleted at the end."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka, client_id="outbox-bench")
    made = Topics(admin)
    try:
        yield made
    finally:
        made.delete()
        admin.close()


def shard_count(url: str) -> int:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_shards").fetchone()
    assert row is not None
    return int(row[0])


def fill(url: str, topic: str, n: int, start: int = 0) -> float:
    """Put n pending events in the outbox with COPY (the write path is measured in
    bench_write); returns the seconds it took."""
    shards = shard_count(url)
    shard = [shard_of(key(i), shards) for i in range(KEYS)]
    now = datetime.now(UTC)
    started = time.monotonic()
    with psycopg.connect(libpq_url(url)) as conn, conn.cursor() as cur, cur.copy(
        "COPY outbox_events (event_id, topic, key, type, payload, content_type, source, "
        "occurred_at, shard) FROM STDIN"
    ) as copy:
        for i in range(start, start + n):
            copy.write_row((uuid7(), topic, key(i), EVENT_TYPE, value(i), CONTENT_TYPE,
                            SOURCE, now, shard[i % KEYS]))
    return time.monotonic() - started


def relay_for(url: str, kafka: str, client: str, topic: str, **config: Any) -> Relay:
    """A relay with `client`'s publisher and the relay's default producer settings that
    has already relayed one event to `topic`: connected, owning every shard, its
    producer made, with a producer id and the topic's metadata. A timed drain that
    follows counts none of that (the raw producers are warmed up the same way)."""
    settings = KafkaSettings(kafka)
    relay = Relay(RelayConfig(db_url=url, **config), lambda: make_publisher(client, settings))
    fill(url, topic, 1)
    drain(relay, 1)
    return relay


def drain(relay: Relay, n: int, timeout: float = 900.0) -> float:
    """Run the relay until it has published n more events; returns events/s."""
    goal = relay.published + n
    started = idle_since = time.monotonic()
    while relay.published < goal:
        now = time.monotonic()
        if relay.step(wait=False):
            idle_since = now
        elif now - idle_since > 10.0 or now - started > timeout:
            raise RuntimeError(f"the relay published {relay.published - goal + n:,} of "
                               f"{n:,} events in {now - started:.0f}s, the last "
                               f"{now - idle_since:.0f}s with nothing to send")
    return n / (time.monotonic() - started)


def close(relay: Relay) -> None:
    relay.stop()
    relay._close()
