"""The short chaos run (fixed seed, about two minutes) that `make test` includes.

`make chaos SEED=... DURATION=...` runs the long one; see tests/chaos/run.py. The
exactly-once relay's runs (`make chaos ... EXACTLY_ONCE=1`) are not in `make test` yet:
the 600 s one still found 2 duplicates in Kafka and a consumer stall (issue 13).
"""

from __future__ import annotations

import os

import pytest

from tests.chaos.run import KINDS, print_summary, run


def test_short_chaos_run_keeps_every_guarantee() -> None:
    if not os.environ.get("OUTBOX_DATABASE_URL") or not os.environ.get(
            "OUTBOX_KAFKA_BOOTSTRAP_SERVERS"):
        pytest.fail("the chaos run needs the real servers: run it with `make test`",
                    pytrace=False)
    report = run(seed=7, duration=70)
    print_summary(report)
    assert report.violations == {}, (report.violations, report.examples)
    assert report.drain_seconds is not None
    assert report.events_committed > 1000
    assert all(report.faults[k] >= 1 for k in KINDS), dict(report.faults)
