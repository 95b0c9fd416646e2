"""Opening the relay's one PostgreSQL session (see outbox.relay for why there is one).

Its settings are what make a lost relay harmless: `idle_session_timeout` ends the
session of a relay paused past its lease (and with it its shard locks); the statement
timeout bounds a statement stuck on a lock. LISTEN is how writers wake it early."""

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
        conn.execute(f'LISTEN "{store.t.channel}"')
        num_shards = store.shard_count(conn)
        shardcount.mismatch(config.num_shards, num_shards, "the relay")
        store.join(conn)
    except BaseException:
        conn.close()
        raise
    return conn, num_shards
