"""The service loop the relay and the consumer share.

Both are long-running workers with the same manners, so they share one copy of them:

- `run(step)` calls `step` until `stop()`; chores registered with `every()` run between
  steps when due (the consumer's purge and lag; chores that need the relay's session
  run inside its step).
- A step that raises `Outage` (Kafka or the database cannot be used now) is retried
  after a jittered, doubling delay, capped at `backoff_max`; while it lasts, one log
  line per interval says so (`Throttled`), and `recovered()` says when it is over.
  Anything else (a misconfiguration, a bug) ends `run()`: waiting would not heal it.
- SIGTERM and SIGINT call `stop()`, after the callbacks given to
  `install_signal_handlers` (the consumer's watchdog starts its grace there).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from outbox.backoff import Throttled, exponential, jitter


class Outage(Exception):
    """A service the step needs cannot be used now; `what` names it ("db", "kafka"...)
    for the throttled log line, so each outage is logged on its own schedule."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what


@dataclass
class _Chore:
    every: float
    run: Callable[[], object]
    due: float = 0.0


class ServiceLoop:
    """See the module docstring. `name` starts every log line ("relay host:1a2b")."""

    def __init__(self, name: str, logger: logging.Logger, *, backoff_base: float = 0.5,
                 backoff_max: float = 5.0, fields: dict[str, Any] | None = None) -> None:
        self.name = name
        self.log = logger
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stopped = threading.Event()
        self.fields = fields or {}  # the service's id, on each of its lines (outbox.logs)
        self.throttle = Throttled(logger, fields=self.fields)
        self.failures = 0  # consecutive outages; 0 after a step that went through
        self._chores: list[_Chore] = []
        self._on_stop: list[Callable[[], None]] = []

    def every(self, seconds: float, chore: Callable[[], object]) -> None:
        """Run `chore` between steps, at most once per `seconds` (first: after the
        first step)."""
        self._chores.append(_Chore(seconds, chore))

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call `callback` when `stop()` is first called (e.g. to end a wait early)."""
        self._on_stop.append(callback)

    def stop(self) -> None:
        if not self.stopped.is_set():
            self.stopped.set()
            for callback in self._on_stop:
                callback()

    @property
    def stopping(self) -> bool:
        return self.stopped.is_set()

    def install_signal_handlers(self, doing: Callable[[], str] = lambda: "stopping",
                                on_signal: Callable[[], None] = lambda: None) -> None:
        """SIGTERM/SIGINT: log "<name>: signal N, <doing()>", call `on_signal`, stop."""
        def handler(signum: int, frame: FrameType | None) -> None:
            on_signal()
            self.log.info("%s: signal %d, %s", self.name, signum, doing(),
                          extra=self.fields)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self, step: Callable[[], object]) -> None:
        """Call `step` until stopped, backing off from outages (see the module docstring)."""
        while not self.stopped.is_set():
            try:
                step()
            except Outage as exc:
                self.failures += 1
                self.throttle.warn(exc.what, f"{self.name}: {exc}; retrying with backoff")
                self.stopped.wait(self.backoff())
                continue
            self.failures = 0
            self.run_chores(time.monotonic())

    def backoff(self) -> float:
        """The wait before the next try, after `failures` outages in a row."""
        return jitter(exponential(self.backoff_base, self.failures, self.backoff_max))

    def run_chores(self, now: float) -> None:
        for chore in self._chores:
            if now >= chore.due:
                chore.due = now + chore.every
                chore.run()

    def recovered(self, what: str, message: str) -> None:
        """`what` works again: one line, if its outage was logged."""
        self.throttle.recovered(what, f"{self.name}: {message}")
