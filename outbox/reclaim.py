"""Give a drained outbox table's storage back at once: TRUNCATE it while it holds no event.

Why: after a large backlog drains, VACUUM empties the table and its indexes, but hands
a freed B-tree page back for reuse only once a later writing transaction has ended, so
on a quiet server the next burst grows the indexes instead (docs/design.md, "Storage").
An empty table can simply be truncated, which returns every page to the filesystem.

How it stays safe: `LOCK ... NOWAIT` takes the table only if no transaction holds any
lock on it, so no writer is halfway through an insert and nothing queues behind a relay
that is itself waiting. With the lock held, a fresh statement sees every committed row;
the table is truncated only if that finds none. Lock, check and truncation are one
statement, sent in one round trip under a short statement timeout, so a relay that
stalls cannot keep the lock. Writers that come meanwhile wait for it (milliseconds) and
then insert into the new, empty table. The sequence that draws positions is untouched,
so cursors stay valid.

When: only while the relay is idle, at most every `every` seconds, and only if the
statistics say the table is large (`above_bytes`), has no live rows and has been
vacuumed (few dead rows), and the same check made first without the lock finds no row
within UNLOCKED_TIMEOUT_MS (statistics restart at zero after a crash): so the check
under the lock reads a few empty pages.

Its SQL lives here rather than in outbox.store: it is the only statement that needs a
table lock, and the only one sent as a multi-statement string.
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
# The look for a row without the lock: slower than this, and the table is not nearly
# empty of pages, so the look under the lock would be as slow. Left for VACUUM.
UNLOCKED_TIMEOUT_MS = 50
# The statement that locks, checks and truncates: writers wait this long at most, plus
# its commit.
LOCKED_TIMEOUT_MS = 200
MB = 2**20  # as PostgreSQL's pg_size_pretty counts


class Reclaimer:
    """Truncates the relay's events table when it is drained and large (module doc)."""

    def __init__(self, tables: Tables, above_bytes: int | None, every: float = 10.0,
                 locked_timeout_ms: int = LOCKED_TIMEOUT_MS) -> None:
        """`above_bytes` None turns reclaiming off."""
        t = tables.events.name
        self.table = t
        self.above_bytes = above_bytes
        self.every = every
        self.locked_timeout_ms = locked_timeout_ms
        self.reclaimed = 0  # truncations done, and the bytes the last one gave back:
        self.last_freed = 0  # for tests and benchmarks
        self._next = 0.0
        self._gate = (
            "SELECT has_table_privilege(%(t)s, 'TRUNCATE'), n_live_tup, n_dead_tup, "
            "pg_total_relation_size(relid), current_setting('statement_timeout') "
            "FROM pg_stat_all_tables WHERE relid = %(t)s::regclass"
        )
        not_empty = ("RAISE EXCEPTION USING ERRCODE = 'P0001', "
                     f"MESSAGE = 'outbox: {t} is not empty'")
        self._look = f"DO $$ BEGIN IF EXISTS (SELECT FROM {t}) THEN {not_empty}; END IF; END $$"
        self._truncate = (
            f"DO $$ BEGIN LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE NOWAIT; "
            f"IF EXISTS (SELECT FROM {t}) THEN {not_empty}; END IF; TRUNCATE {t}; END $$"
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
        allowed, live, dead, size, _ = row
        if not allowed:
            self._off(f"this role may not TRUNCATE {self.table} (docs/production.md, "
                      "\"Least privilege\")")
            return None
        if live > 0 or dead > MAX_DEAD_ROWS or size < self.above_bytes:
            return None
        if not self._run(conn, self._look, UNLOCKED_TIMEOUT_MS, row[4]):
            return None
        return self.truncate_if_empty(conn)

    def truncate_if_empty(self, conn: psycopg.Connection[Any]) -> int | None:
        """Take the table if no one holds it, and truncate it if it has no row.
        Returns the bytes given back, or None if it was busy or not empty."""
        before, restore = _size_and_timeout(conn, self.table)
        if not self._run(conn, self._truncate, self.locked_timeout_ms, restore):
            return None
        freed = before - _size_and_timeout(conn, self.table)[0]
        self.reclaimed += 1
        self.last_freed = freed
        log.info("reclaimed the drained %s: %.1f MB given back", self.table, freed / MB)
        return freed

    def _run(self, conn: psycopg.Connection[Any], statement: str, timeout_ms: int,
             restore: str) -> bool:
        """Run `statement` under `timeout_ms`, in one round trip and one transaction (a
        failure rolls the timeout back with it). False: busy, not empty or too slow."""
        try:
            conn.execute(f"SET statement_timeout = {timeout_ms}; {statement}; "
                         f"SET statement_timeout = '{restore}'")
        except (errors.LockNotAvailable, errors.QueryCanceled, errors.RaiseException):
            return False  # a writer, a relay or VACUUM holds it; a row; try again later
        except psycopg.OperationalError:
            raise  # the session: the relay's outage handling reconnects
        except psycopg.Error as exc:  # e.g. a foreign key or trigger on the table
            self._off(f"{type(exc).__name__}: {exc}".splitlines()[0])
            return False
        return True

    def _off(self, why: str) -> None:
        log.warning("not reclaiming the drained table's storage: %s", why)
        self.above_bytes = None


def _size_and_timeout(conn: psycopg.Connection[Any], table: str) -> tuple[int, str]:
    row = conn.execute("SELECT pg_total_relation_size(%s::regclass), "
                       "current_setting('statement_timeout')", (table,)).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])
