"""Opening the relay's one PostgreSQL session (see outbox.relay for why there is one).

Its settings are what make a lost relay harmless: `idle_session_timeout` ends the
session of a relay paused past its lease (and with it its shard locks); the statement
timeout bounds a statement stuck on a lock. LISTEN is how writers wake it early.

Without --exactly-once, its commits do not wait for the WAL flush
(`synchronous_commit = off`). What it commits is the bookkeeping of events Kafka already
has: deletes, marks, attempts, dead letters. If PostgreSQL crashes, it loses at most the
last fraction of a second of those commits, and only a suffix of them (the WAL is
flushed in order). Those events are pending again and are sent again, in order: the
same as a relay that dies between Kafka's acknowledgement and its delete, which
at-least-once delivery allows. The exactly-once relay keeps the flush: it begins a
shard's next transaction only once the previous one's rows are durably deleted, so
that the shard's last progress record names every row Kafka may hold twice."""

from __future__ import annotations

from typing import Any

import psycopg

from outbox import shardcount
from outbox.dburl import libpq_url
from outbox.relay_config import RelayConfig
from outbox.store import Store


def open_session(config: RelayConfig, relay_id: str,
                 store: Store) -> tuple[psycopg.Connection[Any], int]:
    """Connect, set the timeouts, LISTEN, check the shard count and join the relays.
    Returns the session and the outbox's number of shards."""
    conn = psycopg.connect(
        libpq_url(config.db_url), autocommit=True, connect_timeout=5,
        application_name=f"outbox-relay {relay_id}"[:63],
    )
    try:
        lease_ms = int(config.lease_seconds * 1000)
        conn.execute(f"SET idle_session_timeout = {lease_ms}")
        conn.execute(f"SET statement_timeout = {max(lease_ms, 30000)}")
        # The claim reads `text` as the bytes the server sends (store.CLAIM_COLUMNS),
        # and Kafka's keys and headers are UTF-8, whatever the database's encoding.
        conn.execute("SET client_encoding = 'UTF8'")
        if not config.exactly_once:
            conn.execute("SET synchronous_commit = off")
        conn.execute(f'LISTEN "{store.t.channel}"')
        num_shards = store.shard_count(conn)
        shardcount.mismatch(config.num_shards, num_shards, "the relay")
        store.join(conn)
    except BaseException:
        conn.close()
        raise
    return conn, num_shards
