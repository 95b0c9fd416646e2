"""Shard ownership: each live relay holds a fair share of the shards, through advisory
locks tied to its session (docs/design.md, "Shards and ownership")."""

from __future__ import annotations

from typing import Any

import psycopg

from outbox.store import Store


def take_fair_share(store: Store, conn: psycopg.Connection[Any], owned: set[int],
                    num_shards: int) -> tuple[list[int], list[int], int]:
    """Release the shards past this session's fair share (N // live relays, the first
    N % live one more) and try to take the missing ones; `owned` is updated in place.
    Returns (released, gained, number of live relays)."""
    n = num_shards
    live = store.live_relays(conn)
    me = conn.info.backend_pid
    if me not in live:
        store.join(conn)
        live = store.live_relays(conn)
    idx = live.index(me)
    target = n // len(live) + (1 if idx < n % len(live) else 0)
    released = sorted(owned, reverse=True)[: max(0, len(owned) - target)]
    for shard in released:
        store.release(conn, shard)
        owned.discard(shard)
    gained: list[int] = []
    start = idx * n // len(live)
    for i in range(n):
        if len(owned) >= target:
            break
        shard = (start + i) % n
        if shard not in owned and store.try_own(conn, shard):
            owned.add(shard)
            gained.append(shard)
    return released, sorted(gained), len(live)


def ranges(shards: list[int]) -> str:
    if not shards:
        return "none"
    out, start, prev = [], shards[0], shards[0]
    for s in [*shards[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ",".join(out)
