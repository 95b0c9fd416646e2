"""Crash points: a process dies at a named instant, for fault-injection tests only.

The chaos harness must hit the crash windows of the design (a relay between Kafka's
ack and the delete, a consumer between its database commit and its offset commit, a
relay dying with sends in flight) every run, not by luck. A crash point is a call in
the code at such an instant; with `OUTBOX_FAULT_CRASH=name:probability[,name:p...]`
set, reaching it ends the process at once (`os._exit`, as abrupt as SIGKILL: no
cleanup, no flush). Unset (always, in production) each call is one dict lookup.
"""

from __future__ import annotations

import os
import random
import sys

POINTS = frozenset({
    "relay.after_send",       # records handed to the producer, none acknowledged yet
    "relay.after_ack",        # Kafka acknowledged the batch, rows not deleted yet
    "consumer.after_commit",  # database transaction committed, offsets not committed
})
EXIT_CODE = 86


def _parse(text: str) -> dict[str, float]:
    points: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, prob = part.partition(":")
        if name not in POINTS:
            raise ValueError(f"unknown crash point {name!r}; known: {sorted(POINTS)}")
        points[name] = float(prob or "1")
    return points


_armed: dict[str, float] = _parse(os.environ.get("OUTBOX_FAULT_CRASH", ""))


def crash_point(name: str) -> None:
    """End the process here if the point is armed (and its coin says so)."""
    if _armed:
        prob = _armed.get(name)
        if prob is not None and random.random() < prob:
            sys.stderr.write(f"outbox: crash point {name} reached, exiting\n")
            sys.stderr.flush()
            os._exit(EXIT_CODE)
