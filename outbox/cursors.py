"""Where each owned shard's next claim starts (docs/design.md, "Cursors").

Per shard, a position below which every pending event was claimed or invisible in
`since`, the snapshot of the last claim. A claim starts past the cursors only when no
transaction in progress at `since` has ended since (Store.claim checks it in the same
statement); otherwise it starts from each shard's beginning.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg

from outbox.store import Claim, Row, Store

T = TypeVar("T")


class Cursors:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.at: dict[int, int] = {}
        self.since: str | None = None
        self._worker: ThreadPoolExecutor | None = None

    def claim(self, conn: psycopg.Connection[Any], shards: list[int],
              per_shard: int) -> Claim:
        """Claim up to `per_shard` events of each shard, from the cursors when safe. Each
        shard the claim returned events of has nothing pending below its first one, so
        its cursor moves there; the cursors stay valid against the claim's snapshot."""
        claim = self.store.claim(conn, shards, per_shard,
                                 [self.at.get(s, 0) for s in shards], self.since)
        heads: dict[int, int] = {}
        for row in claim.rows:
            heads.setdefault(row.shard, row.position)
        for shard, head in heads.items():
            self.at[shard] = head - 1
        self.since = claim.snapshot
        return claim

    def claim_next_during(self, conn: psycopg.Connection[Any], shards: list[int],
                          per_shard: int, last: dict[int, int], snapshot: str,
                          meanwhile: Callable[[], T],
                          before: Callable[[], object] | None = None) -> tuple[T, Claim]:
        """The pipelined claim past the events just sent (`last` per shard), checked
        against `snapshot`, that of the claim they came from (Store.claim_next); run on
        a worker thread, after `before` (the relay's pending delete), while `meanwhile`
        (sending, committing) runs here. The session is the caller's: psycopg
        serialises its statements, and each is a statement of its own, so the lease
        (idle_session_timeout) stays armed between them. Returns what `meanwhile`
        returned and the claim; the worker is done with the session either way."""
        after = [last[s] for s in shards]

        def work() -> Claim:
            if before is not None:
                before()
            return self.store.claim_next(conn, shards, per_shard, after, snapshot)

        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-claim")
        pending = self._worker.submit(work)
        try:
            done = meanwhile()
        except BaseException:
            futures.wait([pending])  # the session is not left in the worker's hands
            raise
        claim = pending.result()
        if claim.from_cursor:
            self.since = claim.snapshot
        return done, claim

    def acked(self, heads: dict[int, int]) -> None:
        """Each shard's acknowledged prefix now ends at `heads[shard]`."""
        self.at.update(heads)

    def forget(self, shards: list[int] | None = None) -> None:
        """Shards let go (all, with the session: the snapshot goes too)."""
        if shards is None:
            self.at.clear()
            self.since = None
        for shard in shards or []:
            self.at.pop(shard, None)


def full_shards(rows: list[Row], per_shard: int) -> list[int]:
    """Shards a claim filled (`per_shard` rows), none of them waiting for a retry: the
    ones whose next events are worth claiming before these are settled."""
    counts: Counter[int] = Counter()
    waiting: set[int] = set()
    for row in rows:
        counts[row.shard] += 1
        if row.backing_off:
            waiting.add(row.shard)
    return [s for s, n in counts.items() if n == per_shard and s not in waiting]
