"""The chaos run's checker: Kafka and the consumer's effects against what committed.

Besides the invariants it explains the duplicates Kafka holds: copies sent close
together are grouped into bursts, each with the faults that ran around it, so a burst
points at the window that produced it.
"""

from __future__ import annotations

import itertools
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg
from kafka import KafkaConsumer

from outbox.dburl import libpq_url


@dataclass
class Copy:
    partition: int
    offset: int
    ts: float  # the record's timestamp (when its producer sent it), epoch seconds


@dataclass
class Findings:
    records: int = 0
    lost: set[str] = field(default_factory=set)
    phantom: set[str] = field(default_factory=set)
    order_violations: int = 0
    order_examples: list[str] = field(default_factory=list)
    order_keys: list[str] = field(default_factory=list)  # every key out of order
    double_applied: list[str] = field(default_factory=list)
    not_applied: int = 0
    duplicates: int = 0
    outbox_left: int = 0
    bursts: list[dict[str, Any]] = field(default_factory=list)


def load_committed(url: str) -> dict[str, tuple[str, int]]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute("SELECT event_id::text, key, version FROM chaos_events").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def progress(url: str) -> tuple[int, int]:
    """(events left in the outbox, events applied); (-1, 0) while the database is away."""
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=5) as conn:
            left = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
            applied = conn.execute("SELECT count(*) FROM chaos_effects").fetchone()
        return int(left[0]) if left else -1, int(applied[0]) if applied else 0
    except psycopg.Error:
        return -1, 0


def counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """The timeline's cumulative counts, in one snapshot: events written (committed),
    left in the outbox (pending), dead-lettered, and applied by the consumer. Events that
    left the outbox were published: written - pending - dead_letters."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM chaos_events), (SELECT count(*) FROM outbox_events "
        "WHERE published_at IS NULL), (SELECT count(*) FROM outbox_dead_letters), "
        "(SELECT count(*) FROM chaos_effects)").fetchone()
    assert row is not None
    written, pending, dead, applied = (int(v) for v in row)
    return {"written": written, "published": written - pending - dead, "pending": pending,
            "dead_letters": dead, "applied": applied}


def check(url: str, kafka: str, topic: str, committed: dict[str, tuple[str, int]],
          timeline: list[dict[str, Any]], started_wall: float,
          read_committed: bool = False) -> Findings:
    """Read the whole topic (as a read_committed consumer, if asked: records of aborted
    transactions are not seen) and the effects table; compare with `committed`."""
    out = Findings()
    first: dict[str, list[int]] = defaultdict(list)  # key -> versions, first copies in order
    first_ids: dict[str, list[str]] = defaultdict(list)  # key -> their event ids
    copies: dict[str, Copy] = {}
    dups: list[tuple[Copy, Copy]] = []  # (first copy, later copy)
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=f"check-{uuid.uuid4().hex}",
                             isolation_level="read_committed" if read_committed
                             else "read_uncommitted")
    quiet = 0
    while quiet < 3:
        batch = consumer.poll(timeout_ms=1000)
        quiet = 0 if batch else quiet + 1
        for recs in batch.values():
            for r in recs:
                out.records += 1
                eid = dict(r.headers)["ce_id"].decode()
                copy = Copy(r.partition, r.offset, r.timestamp / 1000)
                if eid in copies:
                    dups.append((copies[eid], copy))
                    continue
                copies[eid] = copy
                if eid in committed:
                    key, version = committed[eid]
                    first[key].append(version)
                    first_ids[key].append(eid)
    consumer.close()
    seen = set(copies)
    out.lost = set(committed) - seen
    out.phantom = seen - set(committed)
    bad_keys = [k for k, vs in first.items() if any(b <= a for a, b in itertools.pairwise(vs))]
    out.order_violations = sum(sum(1 for a, b in itertools.pairwise(first[k]) if b <= a)
                               for k in bad_keys)
    out.order_keys = sorted(bad_keys)
    for k in bad_keys[:3]:
        i = next(i for i in range(1, len(first[k])) if first[k][i] <= first[k][i - 1])
        a, b = (copies[first_ids[k][j]] for j in (i - 1, i))
        out.order_examples.append(
            f"{k}: versions {first[k][max(0, i - 3):i + 3]} around position {i}; "
            f"v{first[k][i - 1]} {first_ids[k][i - 1]} at {a.partition}/{a.offset} sent "
            f"{a.ts - started_wall:.1f}s, then v{first[k][i]} {first_ids[k][i]} at "
            f"{b.partition}/{b.offset} sent {b.ts - started_wall:.1f}s")
    with psycopg.connect(libpq_url(url)) as conn:
        effects = {str(r[0]): r[1] for r in conn.execute("SELECT event_id, n FROM chaos_effects")}
        left = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
    out.outbox_left = int(left[0]) if left else 0
    out.double_applied = [e for e, n in effects.items() if n > 1]
    out.not_applied = len(set(committed) - set(effects))
    out.phantom |= set(effects) - set(committed)
    out.duplicates = len(dups)
    out.bursts = bursts(dups, timeline, started_wall)
    return out


def bursts(dups: list[tuple[Copy, Copy]], timeline: list[dict[str, Any]],
           started_wall: float, gap: float = 2.0, limit: int = 10) -> list[dict[str, Any]]:
    """Duplicates grouped by when their later copy was sent (a new group after `gap` s
    without one), biggest first, each with the faults that ran from 2 s before its first
    copies to 1 s after its later ones. Times are seconds since the run started."""
    groups: list[list[tuple[Copy, Copy]]] = []
    for pair in sorted(dups, key=lambda d: d[1].ts):
        if groups and pair[1].ts - groups[-1][-1][1].ts <= gap:
            groups[-1].append(pair)
        else:
            groups.append([pair])
    out = []
    for g in sorted(groups, key=len, reverse=True)[:limit]:
        first_from = min(a.ts for a, _ in g) - started_wall
        first_to = max(a.ts for a, _ in g) - started_wall
        again_from = g[0][1].ts - started_wall
        again_to = g[-1][1].ts - started_wall
        near = [f"{f['kind']}@{f['at']:.1f}s+{f['seconds']:.1f}s"
                + (f" ({f['detail']})" if f.get("detail") else "")
                for f in timeline
                if f["at"] <= again_to + 1 and f["at"] + f["seconds"] >= first_from - 2]
        out.append({
            "count": len(g),
            "first_copies_sent_s": [round(first_from, 1), round(first_to, 1)],
            "again_sent_s": [round(again_from, 1), round(again_to, 1)],
            "partitions": sorted({b.partition for _, b in g}),
            # a copy with its first's timestamp was sent again by the producer itself (a
            # retry the broker did not deduplicate); otherwise the relay sent it again
            "producer_retries": sum(1 for a, b in g if a.ts == b.ts),
            "faults_around": near[:20],
        })
    return out
