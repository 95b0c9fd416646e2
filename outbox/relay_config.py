"""How a relay runs: the settings `outbox relay` fills from its flags."""

from __future__ import annotations

from dataclasses import dataclass

from outbox.schema import DEFAULT_PREFIX


@dataclass
class RelayConfig:
    """How a relay runs. `outbox relay` sets most fields from its flags (each with an
    OUTBOX_* variable); retry_base, retry_max and shutdown_grace are Python-only, and
    send_timeout follows --delivery-timeout-ms."""

    db_url: str
    table_prefix: str = DEFAULT_PREFIX
    # None: the database's count (outbox.shardcount); given, it must agree with it.
    num_shards: int | None = None
    batch_size: int = 2000
    poll_interval: float = 1.0
    lease_seconds: float = 10.0
    max_attempts: int = 12
    retry_base: float = 0.5
    retry_max: float = 60.0
    retention_seconds: float | None = None
    # Truncate the events table when it is drained and holds more than this many MB
    # (outbox.reclaim); None or 0: never.
    reclaim_above_mb: float | None = 16.0
    shutdown_grace: float = 10.0
    # A batch still unacknowledged after this long means the producer is stuck (seen with
    # kafka-python after broker restarts): replace it and send the shard again. Keep it
    # above the producer's delivery timeout (120 s by default).
    send_timeout: float = 130.0
    relay_id: str | None = None
    # Kafka transactions, fenced per shard (outbox.exactly_once): read_committed consumers
    # see each event once. The transaction timeout is the lease.
    exactly_once: bool = False
    # Names the transactional ids and the progress topic; None: <database>.<table_prefix>.
    txn_namespace: str | None = None
