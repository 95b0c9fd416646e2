"""The watchdog thread: a handler that hangs never blocks the process for good.

- A handler call running longer than `hang_report_interval` is logged (event id, topic,
  partition, offset), again every interval.
- A handler call running longer than `handler_timeout` cannot be interrupted safely in
  Python (a thread cannot be killed; the call may hold locks): the watchdog records it
  as one failed attempt of its event (in `<prefix>_attempts`, on a connection of its
  own), logs an ERROR, and ends the process (exit status 3, EXIT_HANDLER_TIMEOUT), so
  the supervisor restarts it. The open transaction dies with the connection: nothing of
  the batch is committed; the batch is redelivered, and after `max_attempts` timeouts
  the event is dead-lettered like any failing event. (Database work in the handler is
  bounded sooner by the connection's `statement_timeout`, which the runner sets to the
  same value, and fails as an ordinary attempt. An async handler is cancelled at the
  timeout instead; the watchdog acts only if it blocks the event loop.) For a
  `handle_batch` call the failing event is not known: its events are marked as suspects,
  without counting an attempt, and the next run calls the handler one event at a time.
- After a stop signal, a runner not stopped within `shutdown_grace` (a hung handler)
  ends the process without committing its batch (exit status 1, EXIT_NOT_STOPPED).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

from outbox.consumer.calls import HandlerCalls, Running

log = logging.getLogger("outbox.consumer")

#: Exit status of a process that did not stop within the shutdown grace after SIGTERM.
EXIT_NOT_STOPPED = 1
#: Exit status of a process whose handler outlasted `handler_timeout`.
EXIT_HANDLER_TIMEOUT = 3
#: An async handler gets this much longer before the watchdog steps in: asyncio's own
#: timeout cancels it first unless it blocks the event loop.
ASYNC_GRACE = 5.0


class Watchdog:
    """Watches `calls.running` from a daemon thread; see the module docstring."""

    def __init__(self, group: str, calls: HandlerCalls, *, report_interval: float,
                 shutdown_grace: float, handler_timeout: float | None,
                 on_timeout: Callable[[Running, str], None],
                 exit: Callable[[int], None] = os._exit) -> None:
        self.group = group
        self.calls = calls
        self.report_interval = report_interval
        self.shutdown_grace = shutdown_grace
        self.handler_timeout = handler_timeout
        self.on_timeout = on_timeout
        self.exit = exit
        self.signalled_at: float | None = None
        self._done = threading.Event()
        self._last: Running | None = None
        self._next_report = report_interval

    def start(self) -> None:
        self._done.clear()
        threading.Thread(target=self._loop, daemon=True,
                         name=f"outbox-consumer-watchdog-{self.group}").start()

    def stop(self) -> None:
        self._done.set()

    def signalled(self) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()

    def _loop(self) -> None:
        tick = min(1.0, self.report_interval / 4)
        while True:
            wait = tick
            if self.signalled_at is not None:
                wait = min(wait, max(0.01, self.signalled_at + self.shutdown_grace
                                     - time.monotonic()))
            if self._done.wait(wait):
                return
            self.check(time.monotonic())

    def overdue(self) -> bool:
        """A handler call has run past `handler_timeout` (the process is about to end)."""
        running, limit = self.calls.running, self.handler_timeout
        return running is not None and limit is not None and \
            time.monotonic() - running.started >= limit

    def check(self, now: float) -> None:
        """One look at the handler in progress (the loop calls it every tick)."""
        running = self.calls.running
        if running is not self._last:
            self._last, self._next_report = running, self.report_interval
        if running is not None:
            ran = now - running.started
            if ran >= self._next_report:
                log.warning("consumer %s: handler for %s has been running %.0f s; its "
                            "partition and the batch's transaction wait for it",
                            self.group, running, ran)
                self._next_report += self.report_interval
            limit = self.handler_timeout
            if limit is not None and ran >= limit + (ASYNC_GRACE if running.is_async else 0):
                self._timed_out(running, ran)
                return
        signalled = self.signalled_at
        if signalled is not None and now - signalled >= self.shutdown_grace:
            self._not_stopped(running, now - signalled)

    def _timed_out(self, running: Running, ran: float) -> None:
        error = (f"HandlerTimeout: the handler ran longer than handler_timeout "
                 f"({self.handler_timeout:g} s)")
        try:
            self.on_timeout(running, error)
            counted = ("counted as a failed attempt" if len(running.events) == 1 else
                       "its events marked to be handled one at a time")
        except Exception as exc:
            counted = f"the attempt could not be recorded ({exc})"
        log.error("consumer %s: the handler for %s has been running %.0f s, longer than "
                  "handler_timeout (%g s); %s; exiting (status %d) without committing its "
                  "batch, for the supervisor to restart the consumer", self.group, running,
                  ran, self.handler_timeout, counted, EXIT_HANDLER_TIMEOUT)
        self._exit(EXIT_HANDLER_TIMEOUT)

    def _not_stopped(self, running: Running | None, waited: float) -> None:
        """End the process now, as abruptly as SIGKILL: the open transaction dies with the
        connection, so the batch in hand is not committed (it is redelivered, and the
        dedupe records skip whatever an earlier commit applied)."""
        if running is not None:
            what = (f"the handler for {running} has been running "
                    f"{time.monotonic() - running.started:.0f} s; exiting without "
                    "committing its batch")
        else:
            what = "exiting; a batch not committed yet will be redelivered"
        log.error("consumer %s: not stopped %.0f s after the stop signal (shutdown grace "
                  "%g s): %s", self.group, waited, self.shutdown_grace, what)
        self._exit(EXIT_NOT_STOPPED)

    def _exit(self, status: int) -> None:
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        self.exit(status)
