"""The relay's one producer: made when first needed, replaced after a fatal error, closed
within the shutdown grace. Kept apart from the relay so that making a producer (which
may fail while Kafka is down) is an outage of its own, retried by the service loop."""

from __future__ import annotations

import logging
from collections.abc import Callable

from outbox.backoff import first_line
from outbox.publisher import Publisher

log = logging.getLogger("outbox.relay")


class ProducerUnavailable(Exception):
    """No producer could be made (Kafka unreachable, or misconfigured: see diagnose)."""


class ProducerSlot:
    def __init__(self, make: Callable[[], Publisher], on_made: Callable[[], None]) -> None:
        self._make = make
        self._on_made = on_made
        self.publisher: Publisher | None = None

    def get(self) -> Publisher:
        """The producer, made now if there is none (ProducerUnavailable if that fails)."""
        if self.publisher is None:
            try:
                self.publisher = self._make()
            except Exception as exc:
                raise ProducerUnavailable(first_line(exc)) from exc
            self._on_made()
        return self.publisher

    def replace(self) -> None:
        """After a fatal error or an abandoned cycle: stragglers of the old producer must
        not land among the new sends. `recover()` starts afresh; if even that fails,
        the next `get()` makes a new one."""
        if self.publisher is not None:
            try:
                self.publisher.recover()
            except Exception:
                self.publisher = None

    def close(self, timeout: float, who: str) -> None:
        """Whatever is still unacknowledged stays in the outbox: no reason to wait past
        `timeout` (the grace the operator gave)."""
        if self.publisher is not None:
            try:
                self.publisher.close(timeout=timeout)
            except Exception as exc:
                log.warning("%s: closing the producer: %s", who, exc)
            self.publisher = None
