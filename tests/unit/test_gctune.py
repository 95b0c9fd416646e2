"""outbox.gctune: what `outbox relay` and `outbox consume` do to the collector."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
from click.testing import CliRunner

from outbox import gctune
from outbox.cli import main


def test_tune_freezes_the_startup_heap_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    kept = [object(), {"a": [1]}]  # alive at startup: frozen, out of every pass
    gctune.tune()
    assert gc.get_freeze_count() >= len(kept)
    assert gc.get_threshold() == (gctune.YOUNG_THRESHOLD, before[1], before[2])


def test_cycles_made_after_tuning_are_still_collected() -> None:
    gctune.tune()

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # a cycle: reference counting alone does not free it
    gc.collect()
    assert gone() is None


def test_consume_tunes_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeRunner:
        def __init__(self, handler: Any, **kw: Any) -> None:
            pass

        def install_signal_handlers(self) -> None:
            pass

        def run(self) -> None:
            seen.append(gc.get_threshold()[0])

    monkeypatch.setattr("outbox.consumer.ConsumerRunner", FakeRunner)
    monkeypatch.setattr("outbox.cli._preflight", lambda *a, **kw: None)
    default = gc.get_threshold()[0]
    seen: list[int] = []
    args = ["consume", "tests.unit.test_consumer:on_order", "--db",
            "postgresql://u:p@127.0.0.1:1/d", "--kafka", "k:9"]
    for env, expected in (({"OUTBOX_GC_TUNING": "false"}, default),
                          ({}, gctune.YOUNG_THRESHOLD)):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 0, result.output
        assert seen[-1] == expected


def test_both_workers_take_the_option() -> None:
    for command in ("relay", "consume"):
        out = CliRunner().invoke(main, [command, "--help"])
        assert "--no-gc-tuning" in out.output and "OUTBOX_GC_TUNING" in out.output
