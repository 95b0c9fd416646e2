"""Garbage-collector settings for the long-running relay and consumer processes.

CPython's cyclic collector makes a young pass every 700 container allocations, and a
full pass over every tracked object whenever those promoted since the last full pass
reach a quarter of the long-lived ones. A relay round keeps thousands of claimed rows
(tuples, header lists) alive until it is settled, so they are promoted, and a full pass
over everything the process imported (SQLAlchemy, psycopg, the Kafka client) followed
about once a round: measured on the confluent relay, that was a third of its CPU
(docs/benchmarks.md, "Garbage collection").

`tune()` freezes what exists when the worker starts (its modules and configuration:
never garbage, so no pass needs to look at them again; anything frozen that later
becomes cyclic garbage is never collected, which for startup objects is nothing of
note) and raises the young threshold, so a batch's objects are freed by reference
counting before a pass sees them. Cycles are still collected, only less often.
`outbox relay` and `outbox consume` call it unless `--no-gc-tuning`; a process that
embeds a Relay or a ConsumerRunner may call it once its own setup is done.
"""

from __future__ import annotations

import gc

#: Container allocations (net of frees) between young passes; CPython's default is 700.
YOUNG_THRESHOLD = 100_000


def tune() -> None:
    """Collect once, freeze the survivors, and raise the young threshold."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
