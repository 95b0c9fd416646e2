"""The SQL the writer runs at commit on PostgreSQL: lock the keys, take a transaction
id, insert the events, NOTIFY when a relay waits (docs/design.md, "Write-time ordering",
"Cursors")."""

from __future__ import annotations

from outbox.schema import Tables


def write_statements(tables: Tables) -> dict[str, str]:
    """One round trip per commit: lock the keys (sorted: no deadlock), take a transaction
    id, insert every event in publish order, and NOTIFY only if a relay of one of these
    shards sleeps.

    The transaction id comes before the positions are drawn, so a transaction that holds
    an uncommitted position is in every later snapshot's in-progress list: the relay's
    pipelined claim relies on it (store.Store.claim_next).
    """
    sh = tables.shards.name
    write = (
        f"WITH n AS MATERIALIZED (SELECT count(*) AS n FROM {sh}), "
        "locks AS MATERIALIZED (SELECT count(pg_advisory_xact_lock(%(ns)s, k)), "
        "pg_current_xact_id() FROM unnest(%(locks)s::int4[]) AS k), "
        f"ins AS (INSERT INTO {tables.events.name} (event_id, topic, key, type, payload, "
        "content_type, source, headers, occurred_at, shard) "
        "SELECT r.id, r.topic, r.key, r.type, r.payload, r.ct, r.source, r.headers, r.time, "
        "mod(r.h, n.n)::int2 FROM locks, n, unnest(%(ids)s::uuid[], %(topics)s::text[], "
        "%(keys)s::text[], %(types)s::text[], %(payloads)s::bytea[], %(cts)s::text[], "
        "%(sources)s::text[], %(headers)s::json[], %(times)s::timestamptz[], "
        "%(hashes)s::int8[]) AS r(id, topic, key, type, payload, ct, source, headers, time, h)) "
    )
    # (A data-modifying WITH runs to completion even when nothing reads it, and no
    # RETURNING means writers need no SELECT on the events table.)
    return {
        "never": write + "SELECT 1",
        "always": write + "SELECT pg_notify(%(ch)s, '')",
        "auto": write + f"SELECT pg_notify(%(ch)s, '') FROM {sh}, n WHERE relay_waiting "
        "AND shard IN (SELECT mod(h, n.n) FROM unnest(%(hashes)s::int8[]) AS h) LIMIT 1",
    }


def write_one_statements(tables: Tables) -> dict[str, str]:
    """The same for a transaction that published one event."""
    sh = tables.shards.name
    write = (
        f"WITH n AS MATERIALIZED (SELECT count(*) AS n FROM {sh}), "
        "locks AS MATERIALIZED (SELECT pg_advisory_xact_lock(%(ns)s, %(lock)s), "
        "pg_current_xact_id()), "
        f"ins AS (INSERT INTO {tables.events.name} (event_id, topic, key, type, payload, "
        "content_type, source, headers, occurred_at, shard) "
        "SELECT %(id)s, %(topic)s, %(key)s, %(type)s, %(payload)s, %(ct)s, %(source)s, "
        "%(headers)s::json, %(time)s, mod(%(hash)s::int8, n.n)::int2 FROM locks, n) "
    )
    return {
        "never": write + "SELECT 1",
        "always": write + "SELECT pg_notify(%(ch)s, '')",
        "auto": write + f"SELECT pg_notify(%(ch)s, '') FROM {sh}, n "
        "WHERE relay_waiting AND shard = mod(%(hash)s::int8, n.n) LIMIT 1",
    }
