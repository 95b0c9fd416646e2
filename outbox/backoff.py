"""Backing off from a service that is down: jittered delays and throttled log lines.

Shared by the relay and the consumer, so both keep the same manners: retries with
backoff, and one log line per interval while a failure lasts, not one per attempt.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any


def jitter(seconds: float) -> float:
    """A delay between half and all of `seconds`, so retrying processes spread out."""
    return seconds * (0.5 + random.random() / 2)


def exponential(base: float, attempt: int, cap: float) -> float:
    """The delay before retry number `attempt` (1 for the first): `base` doubled per
    earlier attempt, never above `cap`. Pass it through `jitter` before sleeping."""
    if attempt <= 1:
        return min(base, cap)
    return min(cap, base * 2.0 ** min(attempt - 1, 60))


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, short enough for one log line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class Throttled:
    """Log a failure once, then at most once per interval while it lasts."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 fields: dict[str, Any] | None = None) -> None:
        self.log = logger
        self.interval = interval
        self.fields = fields or {}  # on every line (outbox.logs): whose lines these are
        self._last: dict[str, float] = {}

    def warn(self, what: str, msg: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(what, -1e9) >= self.interval:
            self._last[what] = now
            self.log.warning(msg, extra={**self.fields, **fields})

    def recovered(self, what: str, msg: str) -> None:
        if self._last.pop(what, None) is not None:
            self.log.info(msg, extra=self.fields)
