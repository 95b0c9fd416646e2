"""Keys to shards and locks: the hashes writers, relays and tests must agree on.

crc32 is stable across processes, hosts and versions; the INSERT computes the same
shard in SQL from the table's shard count (outbox.write_sql)."""

from __future__ import annotations

import zlib


def key_hash(key: str) -> int:
    """The key's hash (unsigned crc32): stable across processes, hosts and versions."""
    return zlib.crc32(key.encode())


def shard_of(key: str, num_shards: int) -> int:
    """The shard of a key; on PostgreSQL the INSERT computes the same from the table."""
    return key_hash(key) % num_shards


def key_lock(key: str) -> int:
    """The advisory-lock id of a key (a signed int32, as pg_advisory_xact_lock takes)."""
    h = zlib.crc32(key.encode())
    return h - (1 << 32) if h >= 1 << 31 else h
