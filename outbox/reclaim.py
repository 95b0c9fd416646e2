"""Give a drained outbox table's storage back at once: TRUNCATE it while it holds no event.

Why: after a large backlog drains, VACUUM empties the table and its indexes, but hands
a freed B-tree page back for reuse only once a later writing transaction has ended, so
on a quiet server the next burst grows the indexes instead (docs/design.md, "Storage").
An empty table can simply be truncated, which returns every page to the filesystem.

How it stays safe: `LOCK ... NOWAIT` takes the table only if no transaction holds any
lock on it, so no writer is halfway through an insert and nothing waits behind a relay
that is itself waiting. With the lock held, a fresh statement sees every committed row;
the table is truncated only if that finds none. Writers that come meanwhile wait for
the lock (a few milliseconds) and then insert into the new, empty table. The sequence
that draws positions is untouched, so cursors stay valid.

When: only while the relay is idle, at most every `every` seconds, and only if the
statistics say the table is large (`above_bytes`), has no live rows and has been
vacuumed (few dead rows), and the same check made first without the lock found no row
within 50 ms: so the check under the lock reads a few empty pages.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
from psycopg import errors

from outbox.schema import Tables

log = logging.getLogger("outbox.relay")

# More dead rows than this means VACUUM has not been yet: the check under the lock would
# read them all while writers wait, so the table is left for a later try.
MAX_DEAD_ROWS = 10_000
# The check and the truncation run under the table's lock; writers wait this long at most.
LOCKED_TIMEOUT_MS = 200
# The same check made first without the lock; it must take under a quarter of the above.
UNLOCKED_TIMEOUT_MS = 2000


class Reclaimer:
    """Truncates the relay's events table when it is drained and large (module doc)."""

    def __init__(self, tables: Tables, above_bytes: int | None, every: float = 10.0) -> None:
        """`above_bytes` None turns reclaiming off."""
        self.table = tables.events.name
        self.above_bytes = above_bytes
        self.every = every
        self.reclaimed = 0  # truncations done, and the bytes the last one gave back:
        self.last_freed = 0  # for tests and benchmarks
        self._next = 0.0
        self._gate = (
            "SELECT has_table_privilege(%(t)s, 'TRUNCATE'), n_live_tup, n_dead_tup, "
            "pg_total_relation_size(relid) FROM pg_stat_all_tables "
            "WHERE relid = %(t)s::regclass"
        )

    def maybe(self, conn: psycopg.Connection[Any]) -> int | None:
        """When due and the statistics allow, truncate the table if it is empty.
        Returns the bytes given back, or None. `conn` is in autocommit mode."""
        if self.above_bytes is None or time.monotonic() < self._next:
            return None
        self._next = time.monotonic() + self.every
        row = conn.execute(self._gate, {"t": self.table}).fetchone()
        if row is None:
            return None
        allowed, live, dead, size = row
        if not allowed:
            log.info("not reclaiming the drained table's storage: this role may not "
                     "TRUNCATE %s (docs/production.md, \"Least privilege\")", self.table)
            self.above_bytes = None
            return None
        if live > 0 or dead > MAX_DEAD_ROWS or size < self.above_bytes:
            return None
        # Statistics can be wrong (they restart at zero after a crash): look first
        # without the lock, and take it only if that look found nothing, quickly.
        started = time.monotonic()
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL statement_timeout = {UNLOCKED_TIMEOUT_MS}")
                found = conn.execute(f"SELECT EXISTS (SELECT FROM {self.table})").fetchone()
        except errors.QueryCanceled:
            return None
        if found != (False,) or time.monotonic() - started > LOCKED_TIMEOUT_MS / 4000:
            return None
        return self.truncate_if_empty(conn)

    def truncate_if_empty(self, conn: psycopg.Connection[Any]) -> int | None:
        """Take the table if no one holds it, and truncate it if it has no row.
        Returns the bytes given back, or None if it was busy or not empty."""
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL statement_timeout = {LOCKED_TIMEOUT_MS}")
                conn.execute("SET LOCAL synchronous_commit = on")
                conn.execute(f"LOCK TABLE {self.table} IN ACCESS EXCLUSIVE MODE NOWAIT")
                before = _size(conn, self.table)
                if conn.execute(f"SELECT EXISTS (SELECT FROM {self.table})").fetchone() \
                        != (False,):
                    return None
                conn.execute(f"TRUNCATE {self.table}")
                freed = before - _size(conn, self.table)
        except (errors.LockNotAvailable, errors.QueryCanceled):
            return None  # busy: a writer, a relay or VACUUM holds it; try again later
        self.reclaimed += 1
        self.last_freed = freed
        log.info("reclaimed the drained %s: %.1f MB given back", self.table, freed / 1e6)
        return freed


def _size(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute("SELECT pg_total_relation_size(%s::regclass)", (table,)).fetchone()
    return int(row[0]) if row else 0
