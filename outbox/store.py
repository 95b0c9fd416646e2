"""Every SQL statement the relay and `outbox status` run, in one place (the consumer's
dedupe and attempt SQL is its inbox's: outbox.consumer.inbox; `outbox status` only reads
the attempts table, here), but for the idle relay's truncation (outbox.reclaim).

Statements are plain psycopg SQL on one connection; table names come from a validated
prefix (schema.validate_prefix), so formatting them in is safe.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg.rows import dict_row
from psycopg.types.string import ByteaBinaryLoader

from outbox.event import SPEC_HEADER, SPEC_VALUE, KafkaHeaders, stored_to_kafka_headers
from outbox.schema import Tables

# Second key of the advisory lock every live relay holds shared: "I am a relay".
MEMBER_LOCK = 65535

EVENT_COLUMNS = (
    "position, event_id, topic, key, type, payload, content_type, source, headers, "
    "occurred_at, shard, attempts"
)


def relay_namespace(tables: Tables) -> int:
    """First key of the relays' advisory locks (membership and shard ownership)."""
    return tables.lock_namespace ^ 0x2B1D3C4F


# ce_time exactly as event.format_time writes it.
CE_TIME_SQL = "to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"

# What the relay claims: routing columns, then the record as Kafka takes it, formatted by
# PostgreSQL. Read in binary on a claim cursor (`_claim_cursor`), whose `text` columns
# come back as the UTF-8 bytes the server sent: no decoding or encoding per event in
# Python, and no convert_to() per column in PostgreSQL (0.4 µs a row). `topic` is
# varchar, read as str as a topic name is passed.
CLAIM_COLUMNS = (
    "position, shard, attempts, topic, key AS k, payload, event_id::text AS id, "
    f"type AS ty, source AS src, {CE_TIME_SQL} AS tm, content_type AS ct, headers"
)


def _claim_cursor(conn: psycopg.Connection[Any]) -> psycopg.Cursor[Any]:
    """A binary cursor that reads `text` as bytes (CLAIM_COLUMNS); only this cursor's."""
    cur = conn.cursor(binary=True)
    cur.adapters.register_loader("text", ByteaBinaryLoader)
    return cur


class Row(NamedTuple):
    """One pending event as the relay claims it: ready to send as it is."""

    position: int
    shard: int
    attempts: int
    backing_off: bool
    topic: str
    key: bytes
    value: bytes
    headers: KafkaHeaders

    @property
    def event_id(self) -> str:
        return self.headers[1][1].decode()


class Claim(NamedTuple):
    """A claim's rows, the snapshot it read them in (pg_current_snapshot() as text), and
    whether it could start past the given positions (see Store.claim)."""

    rows: list[Row]
    snapshot: str | None
    from_cursor: bool


def _claimed(cur: Any) -> Claim:
    rows = cur.fetchall()
    return (Claim(_rows(rows), rows[0][-2].decode(), rows[0][-1]) if rows
            else Claim([], None, False))


def _rows(cur: Any) -> list[Row]:
    """Rows of a claim (CLAIM_COLUMNS, then backing_off) with their CloudEvents headers."""
    out = []
    for pos, shard, attempts, topic, key, value, eid, typ, src, tm, ct, user, waits, *_ in cur:
        if pos is None:  # a claim's row of NULLs: nothing pending
            continue
        headers = [(SPEC_HEADER, SPEC_VALUE), ("ce_id", eid), ("ce_type", typ),
                   ("ce_source", src), ("ce_time", tm), ("content-type", ct)]
        if user:
            headers.extend(stored_to_kafka_headers(user))
        out.append(Row(pos, shard, attempts, waits, topic, key, value, headers))
    return out


def array_literal(values: Iterable[int | uuid.UUID]) -> str:
    """A PostgreSQL array literal of integers or UUIDs (no quoting needed), for a
    parameter cast to int8[] or uuid[]: psycopg adapts a list element by element in
    Python, which cost the relay about 0.5 µs per acknowledged event; this is one join."""
    return "{" + ",".join(map(str, values)) + "}"


class Store:
    """The SQL of one outbox (one table prefix)."""

    def __init__(self, tables: Tables) -> None:
        self.t = tables
        ev, dl, sh = tables.events.name, tables.dead_letters.name, tables.shards.name
        self.relay_ns = relay_namespace(tables)
        def claim(start: str, gate: str) -> str:
            # g: the statement's snapshot, and whether no transaction in progress at
            # `since` (an earlier claim's snapshot) has ended by now (see claim()). LEFT
            # JOIN: one row of NULLs and the snapshot when nothing is pending.
            return (
                "WITH g AS MATERIALIZED (SELECT pg_current_snapshot() AS snap, "
                "(%(since)s::text IS NULL OR NOT EXISTS (SELECT 1 FROM "
                "pg_snapshot_xip(%(since)s::text::pg_snapshot) AS x(xid) "
                "WHERE pg_visible_in_snapshot(x.xid, pg_current_snapshot()))) AS ok) "
                "SELECT e.*, g.snap::text, g.ok FROM g LEFT JOIN LATERAL (SELECT c.* "
                "FROM unnest(%(shards)s::int[], %(after)s::bigint[]) AS s(shard, after) "
                f"CROSS JOIN LATERAL (SELECT {CLAIM_COLUMNS}, "
                "(next_attempt_at IS NOT NULL AND next_attempt_at > now()) AS waits "
                f"FROM {ev} WHERE shard = s.shard AND published_at IS NULL "
                f"AND position > {start} ORDER BY position LIMIT %(per_shard)s) c{gate}"
                ") e ON true ORDER BY e.shard, e.position"
            )

        self._claim = claim("CASE WHEN g.ok THEN s.after ELSE 0 END", "")
        self._claim_next = claim("s.after", " WHERE g.ok")
        self._claim_skip_locked = (
            f"SELECT {CLAIM_COLUMNS}, false FROM {ev} WHERE published_at IS NULL "
            "ORDER BY position LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
        )
        self._delete = f"DELETE FROM {ev} WHERE position = ANY(%(positions)s::int8[])"
        exact = ("(position, event_id) IN (SELECT * FROM unnest(%(positions)s::bigint[], "
                 "%(ids)s::uuid[]))")
        self._delete_exact = f"DELETE FROM {ev} WHERE {exact}"
        self._mark_exact = (f"UPDATE {ev} SET published_at = now() WHERE {exact} "
                            "AND published_at IS NULL")
        self._mark = (
            f"UPDATE {ev} SET published_at = now() WHERE position = ANY(%(positions)s::int8[]) "
            "AND published_at IS NULL"
        )
        self._purge = (
            f"DELETE FROM {ev} WHERE position IN (SELECT position FROM {ev} "
            "WHERE published_at IS NOT NULL AND published_at < now() - %(age)s "
            "ORDER BY position LIMIT %(limit)s)"
        )
        self._fail = (
            f"UPDATE {ev} SET attempts = attempts + 1, last_error = %(error)s, "
            "next_attempt_at = now() + %(delay)s WHERE position = %(position)s "
            "RETURNING attempts"
        )
        self._dead = (
            f"WITH moved AS (DELETE FROM {ev} WHERE position = %(position)s "
            f"RETURNING {EVENT_COLUMNS}) "
            f"INSERT INTO {dl} ({EVENT_COLUMNS}, error, failed_at) "
            f"SELECT {EVENT_COLUMNS}, %(error)s, now() FROM moved"
        )
        chosen = "(%(all)s OR position = ANY(%(p)s::bigint[]))"  # None: every dead letter
        self._retry_dead = (
            f"WITH moved AS (DELETE FROM {dl} WHERE {chosen} RETURNING "
            "event_id, topic, key, type, payload, content_type, source, headers, "
            "occurred_at, shard) "
            f"INSERT INTO {ev} (event_id, topic, key, type, payload, content_type, source, "
            "headers, occurred_at, shard) "
            "SELECT event_id, topic, key, type, payload, content_type, source, headers, "
            # (set-shards refuses while dead letters exist, so their shards stay valid)
            "occurred_at, shard FROM moved ORDER BY occurred_at"
        )
        self._set_waiting = (
            f"UPDATE {sh} SET relay_waiting = %(waiting)s "
            "WHERE shard = ANY(%(shards)s) AND relay_waiting <> %(waiting)s"
        )
        self._set_owner = (
            f"UPDATE {sh} SET owner = %(owner)s, owner_since = now(), relay_waiting = false "
            "WHERE shard = ANY(%(shards)s)"
        )
        self._has_pending = (
            f"SELECT EXISTS (SELECT 1 FROM unnest(%(shards)s::int[]) AS s(shard) "
            f"CROSS JOIN LATERAL (SELECT 1 FROM {ev} WHERE shard = s.shard "
            "AND published_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= now()) "
            "LIMIT 1) x)"
        )
        self._backlog = (
            "SELECT shard, count(*) AS pending, min(occurred_at) AS oldest, "
            "extract(epoch FROM now() - min(occurred_at))::float8 AS oldest_seconds, "
            f"max(attempts) AS max_attempts FROM {ev} WHERE published_at IS NULL "
            "GROUP BY shard ORDER BY shard"
        )
        # The events' position sequence: how many positions writers drew (rolled-back
        # transactions' too), or NULL when this role may not read it.
        self._positions_drawn = (
            "SELECT CASE WHEN has_sequence_privilege(s.seq, 'SELECT,USAGE') "
            "THEN coalesce(pg_sequence_last_value(s.seq), 0) END "
            "FROM (SELECT pg_get_serial_sequence(%(events)s, 'position')::regclass AS seq) s"
        )
        at = tables.attempts.name
        self._group_retries = (
            f"SELECT consumer_group, count(*), max(attempts) FROM {at} "
            "GROUP BY consumer_group ORDER BY consumer_group"
        )
        self._retrying = (
            f"SELECT event_id::text, attempts, last_error FROM {at} "
            "WHERE consumer_group = %(group)s AND event_id = ANY(%(ids)s::uuid[])"
        )
        self._dead_list = (
            f"SELECT position, event_id, topic, key, type, attempts, error, failed_at "
            f"FROM {dl} ORDER BY position LIMIT %(limit)s"
        )
        self._dead_purge = f"DELETE FROM {dl} WHERE {chosen}"
        self._relays = (
            "SELECT l.pid, a.application_name, a.client_addr::text AS addr, a.backend_start, "
            "array_remove(array_agg(o.objid::int ORDER BY o.objid), NULL) AS shards "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "LEFT JOIN pg_locks o ON o.pid = l.pid AND o.locktype = 'advisory' "
            "  AND o.classid = %(ns)s AND o.objid <> %(member)s AND o.granted "
            "WHERE l.locktype = 'advisory' AND l.classid = %(ns)s AND l.objid = %(member)s "
            "AND l.granted AND l.database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database()) "
            "GROUP BY l.pid, a.application_name, a.client_addr, a.backend_start ORDER BY l.pid"
        )
        self._live_relays = (
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %(ns)s "
            "AND objid = %(member)s AND granted AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database()) ORDER BY pid"
        )

    # -- relay: membership and shards ------------------------------------------------

    def shard_count(self, conn: psycopg.Connection[Any]) -> int:
        """The outbox's shard count: the rows of the shards table (see shardcount.py)."""
        row = conn.execute(f"SELECT count(*) FROM {self.t.shards.name}").fetchone()
        return int(row[0]) if row else 0

    def join(self, conn: psycopg.Connection[Any]) -> None:
        """Announce this session as a live relay (a shared lock that dies with it)."""
        conn.execute("SELECT pg_advisory_lock_shared(%s, %s)", (self.relay_ns, MEMBER_LOCK))

    def live_relays(self, conn: psycopg.Connection[Any]) -> list[int]:
        rows = conn.execute(self._live_relays, {"ns": self.relay_ns, "member": MEMBER_LOCK})
        return [r[0] for r in rows]

    def try_own(self, conn: psycopg.Connection[Any], shard: int) -> bool:
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (self.relay_ns, shard)).fetchone()
        return bool(row and row[0])

    def release(self, conn: psycopg.Connection[Any], shard: int) -> None:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (self.relay_ns, shard))

    def set_owner(self, conn: psycopg.Connection[Any], shards: list[int], owner: str) -> None:
        conn.execute(self._set_owner, {"shards": shards, "owner": owner})

    def set_waiting(self, conn: psycopg.Connection[Any], shards: list[int], waiting: bool) -> None:
        conn.execute(self._set_waiting, {"shards": shards, "waiting": waiting})

    # -- relay: the hot path --------------------------------------------------------

    def claim(self, conn: psycopg.Connection[Any], shards: list[int], per_shard: int,
              after: list[int] | None = None, since: str | None = None) -> Claim:
        """The oldest pending events of each shard, in position order: past `after` (a
        cursor per shard, kept by the relay) when that is safe, else from the start.

        No row locks: shard ownership already makes this relay the only one reading these
        shards. A cursor skips the dead index entries that deleted events leave until
        VACUUM, which a claim from the start walks on every call.

        Positions are drawn before commit, so a transaction that commits late can add a
        position below a cursor. The relay keeps, per shard, a cursor below which every
        pending event was either claimed or invisible in `since` (the snapshot of its
        last claim). An invisible one belongs to a transaction in progress in `since`
        (writers take a transaction id before they draw a position). While none of those
        has ended, no such event is visible, and no later event of its key exists yet
        (its key's lock is held): starting past the cursor skips nothing. Once one has
        ended, this claim starts from each shard's beginning instead
        (`Claim.from_cursor` is False). docs/design.md, "Cursors", has the whole argument.
        """
        return _claimed(_claim_cursor(conn).execute(self._claim, {
            "shards": shards, "per_shard": per_shard, "after": after or [0] * len(shards),
            "since": since}))

    def claim_next(self, conn: psycopg.Connection[Any], shards: list[int], per_shard: int,
                   after: list[int], since: str) -> Claim:
        """Each shard's next events past `after` (its last event in flight, claimed in
        snapshot `since`); nothing at all unless that is safe, as in claim()."""
        return _claimed(_claim_cursor(conn).execute(self._claim_next, {
            "shards": shards, "per_shard": per_shard, "after": after, "since": since}))

    def claim_skip_locked(self, conn: psycopg.Connection[Any], limit: int) -> list[Row]:
        """The naive claim, for fault injection only (`OUTBOX_UNSAFE_DISABLE=shards`):
        it reorders a key's events as soon as two relays run."""
        return _rows(_claim_cursor(conn).execute(self._claim_skip_locked, {"limit": limit}))

    def has_pending(self, conn: psycopg.Connection[Any], shards: list[int]) -> bool:
        row = conn.execute(self._has_pending, {"shards": shards}).fetchone()
        return bool(row and row[0])

    def acknowledge(self, conn: psycopg.Connection[Any], positions: list[int],
                    keep: bool) -> int:
        """Published: delete the rows (or, with retention, mark them for a later purge).
        Returns how many were pending."""
        return conn.execute(self._mark if keep else self._delete,
                            {"positions": array_literal(positions)}).rowcount

    def acknowledge_exact(self, conn: psycopg.Connection[Any], done: list[tuple[int, str]],
                          keep: bool) -> int:
        """`acknowledge` the rows that are still these (position, event id) pairs; a
        row of the same position with another event id is not one of them."""
        return conn.execute(self._mark_exact if keep else self._delete_exact,
                            {"positions": array_literal(p for p, _ in done),
                             # read back from Kafka (outbox.progress): a uuid, checked
                             "ids": array_literal(uuid.UUID(i) for _, i in done)}).rowcount

    def purge_published(self, conn: psycopg.Connection[Any], age_seconds: float,
                        limit: int) -> int:
        cur = conn.execute(self._purge, {"age": _interval(age_seconds), "limit": limit})
        return cur.rowcount

    def record_failure(self, conn: psycopg.Connection[Any], position: int, error: str,
                       delay_seconds: float) -> int:
        row = conn.execute(self._fail, {"position": position, "error": error[:2000],
                                        "delay": _interval(delay_seconds)}).fetchone()
        return int(row[0]) if row else 0

    def dead_letter(self, conn: psycopg.Connection[Any], position: int, error: str) -> None:
        conn.execute(self._dead, {"position": position, "error": error[:2000]})

    # -- status and dead letters ------------------------------------------------------

    def backlog(self, conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
        with conn.cursor(row_factory=dict_row) as cur:
            return list(cur.execute(self._backlog))

    def relays(self, conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
        with conn.cursor(row_factory=dict_row) as cur:
            return list(cur.execute(self._relays, {"ns": self.relay_ns, "member": MEMBER_LOCK}))

    def dead_letters(self, conn: psycopg.Connection[Any], limit: int) -> list[dict[str, Any]]:
        with conn.cursor(row_factory=dict_row) as cur:
            return list(cur.execute(self._dead_list, {"limit": limit}))

    def now(self, conn: psycopg.Connection[Any]) -> datetime:
        """The database's clock: ages and rates are measured on it."""
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        return row[0]  # type: ignore[no-any-return]

    def positions_drawn(self, conn: psycopg.Connection[Any]) -> int | None:
        """Positions writers have drawn so far (None without the right to read the
        sequence): successive values give the write rate."""
        row = conn.execute(self._positions_drawn, {"events": self.t.events.name}).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def group_retries(self, conn: psycopg.Connection[Any]) -> dict[str, tuple[int, int]]:
        """Per consumer group with events in retry: (how many, most attempts of one)."""
        return {r[0]: (int(r[1]), int(r[2]))
                for r in conn.execute(self._group_retries)}

    def retrying(self, conn: psycopg.Connection[Any], group: str, event_ids: list[str]
                 ) -> dict[str, tuple[int, str | None]]:
        """Which of these events (ids as text, UUIDs) the group is retrying: id ->
        (failed attempts, last error)."""
        rows = conn.execute(self._retrying, {"group": group, "ids": event_ids})
        return {r[0]: (int(r[1]), r[2]) for r in rows}

    def count_dead_letters(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(f"SELECT count(*) FROM {self.t.dead_letters.name}").fetchone()
        return int(row[0]) if row else 0

    def retry_dead_letters(self, conn: psycopg.Connection[Any],
                           positions: list[int] | None) -> int:
        """Move dead letters (all of them for None) back into the outbox, at its end."""
        return conn.execute(self._retry_dead, _chosen(positions)).rowcount

    def purge_dead_letters(self, conn: psycopg.Connection[Any],
                           positions: list[int] | None) -> int:
        """Delete dead letters (all of them for None) for good."""
        return conn.execute(self._dead_purge, _chosen(positions)).rowcount


def _chosen(positions: list[int] | None) -> dict[str, Any]:
    return {"all": positions is None, "p": positions or []}


def _interval(seconds: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=seconds)
