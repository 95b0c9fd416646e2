"""OpenTelemetry across the outbox: one trace from the request that wrote an event to
the consumer that applied it (the `otel` extra: opentelemetry-api).

- `publish()` copies the current span's context into the event's headers (W3C
  `traceparent` and `tracestate`), so it is stored with the row and the relay sends it
  on as Kafka headers, as any user header.
- The relay records one `send` span per claimed batch, linked to the contexts of the
  events it carries (a batch has many parents, so links, not a parent: the messaging
  semantic conventions' choice for batches), up to the SDK's default of 128 links.
- The consumer records one `process` span per event, a child of the context the
  event carries, with the messaging attributes and `outbox.outcome`: applied,
  duplicate, retried or dead_lettered, or redone when the batch's fast path rolled
  back and the event was applied again under a new span.

Without opentelemetry-api installed nothing is imported and nothing changes: every
function here is then a no-op. With it installed but no SDK's tracer provider set, the
relay and the consumer make no spans, and `publish()` adds headers only when there is
a valid current span (some other component traces).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_HEADERS = (TRACEPARENT, TRACESTATE)
_NAME = "transactional-outbox"

_available: bool | None = None


def enabled() -> bool:
    """Whether opentelemetry-api is installed (checked once, without importing it)."""
    global _available
    if _available is None:
        try:
            _available = importlib.util.find_spec("opentelemetry") is not None
        except (ImportError, ValueError):  # blocked: sys.modules["opentelemetry"] = None
            _available = False
    return _available


_tracer_of: tuple[Any, Any] = (None, None)  # (provider, its tracer): made once per provider


def _tracer() -> Any:
    """The outbox's tracer once an SDK's tracer provider is installed, else None: until
    then the API hands out non-recording spans, and the relay's and consumer's spans are
    skipped (extracting each event's context would cost without showing anywhere)."""
    global _tracer_of
    if not enabled():
        return None
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    if _tracer_of[0] is not provider:
        _tracer_of = (provider, provider.get_tracer(_NAME))
    return _tracer_of[1]


def inject(headers: dict[str, Any]) -> dict[str, Any]:
    """Checked user `headers` with the current trace context added (a copy), or as they
    were when there is no current span, no opentelemetry, or the caller set the trace
    headers itself (its own context wins)."""
    if not enabled():
        return headers
    from opentelemetry import propagate, trace

    if not trace.get_current_span().get_span_context().is_valid:
        return headers
    if any(h in headers for h in TRACE_HEADERS):
        return headers
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    added = {k: v for k, v in carrier.items() if k in TRACE_HEADERS}
    return {**headers, **added} if added else headers


def _carrier(headers: Iterable[tuple[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        if name in TRACE_HEADERS and value is not None:
            out[name] = value.decode("utf-8", "replace") if isinstance(
                value, bytes | bytearray) else str(value)
    return out


def _extract(headers: Iterable[tuple[str, Any]]) -> Any:
    """The context a record's headers carry (None when they carry none)."""
    carrier = _carrier(headers)
    if TRACEPARENT not in carrier:
        return None
    from opentelemetry import propagate

    return propagate.extract(carrier)


MAX_LINKS = 128  # the SDK's default limit of links per span: no use parsing more


@contextmanager
def send_span(rows: Sequence[Any], relay_id: str) -> Iterator[None]:
    """The relay's span for one claimed batch of rows (each with `.topic` and
    `.headers`, its Kafka headers): kind PRODUCER, linked to the contexts of its first
    MAX_LINKS traced events."""
    tracer = _tracer() if rows else None
    if tracer is None:
        yield
        return
    from opentelemetry import trace

    links: list[Any] = []
    for row in rows:
        if len(links) >= MAX_LINKS:
            break
        context = _extract(row.headers)
        if context is not None:
            span_context = trace.get_current_span(context).get_span_context()
            if span_context.is_valid:
                links.append(trace.Link(span_context))
    names = sorted({row.topic for row in rows})
    destination = names[0] if len(names) == 1 else "multiple"
    with tracer.start_as_current_span(
            f"send {destination}", kind=trace.SpanKind.PRODUCER, links=links,
            attributes={"messaging.system": "kafka", "messaging.operation.type": "send",
                        "messaging.operation.name": "send",
                        "messaging.destination.name": destination,
                        "messaging.batch.message_count": len(rows),
                        "outbox.relay.id": relay_id}):
        yield


class ProcessSpan:
    """One event's consumer span. `outcome` and `error` are set as the event is handled;
    the span ends when its batch's transaction is over (see Spans)."""

    def __init__(self, span: Any) -> None:
        self._span = span
        self.outcome = "applied"
        self.error: BaseException | None = None

    def current(self) -> AbstractContextManager[None]:
        """Make it the current span while the handler runs: the handler's own spans,
        and the events it publishes, then belong to this trace."""
        return _NOTHING if self._span is None else self._current()

    @contextmanager
    def _current(self) -> Iterator[None]:
        from opentelemetry import trace

        with trace.use_span(self._span, end_on_exit=False, record_exception=False,
                            set_status_on_exception=False):
            yield

    def end(self, outcome: str | None = None) -> None:
        if self._span is None:
            return
        if self.error is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.record_exception(self.error)
            self._span.set_status(Status(StatusCode.ERROR, type(self.error).__name__))
        self._span.set_attribute("outbox.outcome", outcome or self.outcome)
        self._span.end()
        self._span = None


class _NoSpan(ProcessSpan):
    """Without a tracer: one shared object that keeps nothing written to it (no
    exception and its frames held, nothing shared between consumer threads)."""

    def __setattr__(self, name: str, value: Any) -> None:
        return None


_NOTHING: AbstractContextManager[None] = nullcontext()  # reusable, shared
_NO_SPAN = _NoSpan.__new__(_NoSpan)
object.__setattr__(_NO_SPAN, "_span", None)
object.__setattr__(_NO_SPAN, "outcome", "applied")
object.__setattr__(_NO_SPAN, "error", None)


class Spans:
    """The consumer spans of one attempt at a batch. They end when its transaction is
    over: with their outcomes once it committed, as `redone` when it rolled back (the
    batch is then applied again, with a savepoint per event, under new spans)."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._tracer = _tracer()  # once per batch, not per event
        self._open: list[ProcessSpan] = []

    def start(self, topic: str, partition: int, event_id: object,
              headers: Iterable[tuple[str, Any]] | None,
              outcome: str = "applied") -> ProcessSpan:
        """A child span of the context the event carries (no-op without a tracer)."""
        if self._tracer is None:
            return _NO_SPAN
        from opentelemetry import trace

        span = ProcessSpan(self._tracer.start_span(
            f"process {topic}", context=_extract(headers or ()),
            kind=trace.SpanKind.CONSUMER,
            attributes={"messaging.system": "kafka", "messaging.operation.type": "process",
                        "messaging.operation.name": "process",
                        "messaging.destination.name": topic,
                        "messaging.destination.partition.id": str(partition),
                        "messaging.message.id": str(event_id),
                        "messaging.consumer.group.name": self.group}))
        span.outcome = outcome
        self._open.append(span)
        return span

    def end(self, committed: bool) -> None:
        for span in self._open:
            span.end(None if committed else "redone")
        self._open.clear()
