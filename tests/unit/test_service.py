"""The service loop shared by relay and consumer: backoff, throttled logs, chores, signals."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator

import pytest

from outbox.service import Outage, ServiceLoop


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_an_outage_backs_off_doubling_and_logs_once_per_interval(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = ServiceLoop("relay r1", logging.getLogger("test.service"), backoff_base=0.5,
                       backoff_max=2.0)
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return False

    monkeypatch.setattr(loop.stopped, "wait", wait)
    steps = 0

    def step() -> None:
        nonlocal steps
        steps += 1
        if steps <= 5:
            raise Outage("db", "database unavailable (refused)")
        if steps == 6:
            loop.recovered("db", "database reachable again")
            return
        loop.stop()

    with caplog.at_level(logging.INFO, "test.service"):
        loop.run(step)
    assert steps == 7
    # jittered between half and all of 0.5, 1, 2, 2, 2 (capped)
    for waited, full in zip(waits, [0.5, 1.0, 2.0, 2.0, 2.0], strict=True):
        assert full / 2 <= waited <= full
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["relay r1: database unavailable (refused); retrying with backoff",
                     "relay r1: database reachable again"]
    assert loop.failures == 0


def test_other_errors_end_the_loop() -> None:
    loop = ServiceLoop("consumer g", logging.getLogger("test.service"))

    def step() -> None:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError, match="a bug"):
        loop.run(step)


def test_chores_run_between_steps_when_due() -> None:
    loop = ServiceLoop("consumer g", logging.getLogger("test.service"))
    ran: list[str] = []
    loop.every(10.0, lambda: ran.append("purge"))
    loop.every(0.0, lambda: ran.append("lag"))
    loop.run_chores(100.0)
    loop.run_chores(105.0)
    loop.run_chores(110.0)
    assert ran == ["purge", "lag", "lag", "purge", "lag"]
    steps = 0

    def step() -> None:
        nonlocal steps
        steps += 1
        if steps == 2:
            raise Outage("kafka", "down")  # no chores after a failed step
        if steps == 3:
            loop.stop()

    loop = ServiceLoop("consumer g", logging.getLogger("test.service"))
    ran.clear()
    loop.every(0.0, lambda: ran.append(f"after step {steps}"))
    loop.backoff = lambda: 0.0  # type: ignore[method-assign]
    loop.run(step)
    assert ran == ["after step 1", "after step 3"]


def test_a_signal_stops_the_loop_after_its_callbacks(restore_signals: None,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    loop = ServiceLoop("relay r1", logging.getLogger("test.service"))
    order: list[str] = []
    loop.on_stop(lambda: order.append("on_stop"))
    loop.install_signal_handlers(lambda: "finishing the batch in flight",
                                 on_signal=lambda: order.append("on_signal"))

    def step() -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    with caplog.at_level(logging.INFO, "test.service"):
        loop.run(step)
    assert loop.stopping
    assert order == ["on_signal", "on_stop"]
    assert f"relay r1: signal {int(signal.SIGTERM)}, finishing the batch in flight" in \
        caplog.messages
    loop.stop()  # a second stop calls nothing again
    assert order == ["on_signal", "on_stop"]
