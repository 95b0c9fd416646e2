"""What a user's own test suite needs: an in-memory publisher and a relay run to empty.

    publisher = InMemoryPublisher()
    drain(db_url, publisher)            # every committed event is now in publisher.records

No sleeping in tests waiting for delivery: `drain` returns when the outbox is empty.
"""

from __future__ import annotations

import time

from outbox.publisher import InMemoryPublisher, Publisher, Record
from outbox.relay import Relay, RelayConfig


def drain(db_url: str, publisher: Publisher, *, timeout: float = 60.0,
          config: RelayConfig | None = None) -> int:
    """Run one relay on PostgreSQL until the outbox holds no publishable event.

    Returns the number of events published. Raises TimeoutError if events remain
    (e.g. retries backing off) after `timeout` seconds.
    """
    cfg = config or RelayConfig(db_url=db_url)
    relay = Relay(cfg, lambda: publisher)
    deadline = time.monotonic() + timeout
    try:
        while True:
            relay.step(wait=False)
            conn = relay._connection()
            if relay.owned_shards and not relay.store.has_pending(conn, relay.owned_shards) \
                    and len(relay.owned_shards) == cfg.num_shards:
                return relay.published
            if time.monotonic() > deadline:
                raise TimeoutError(f"outbox not drained after {timeout}s")
            time.sleep(0.01)
    finally:
        relay._drop_connection()


__all__ = ["InMemoryPublisher", "Record", "drain"]
