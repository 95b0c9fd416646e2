"""Transactional producers for the exactly-once relay: one Kafka transactional id each.

Making one (`make_txn_producer`) initializes its transactional id: Kafka bumps the id's
epoch, which fences every older producer of that id, and aborts whatever transaction
it left open. Then `begin()`, `send()`s, `commit()` (or `abort()`). A `read_committed`
consumer sees the records of committed transactions only.

Errors, as the exactly-once sender needs them:
- `Fenced`: a newer producer holds the id (another relay took the shard): stop using it.
- `TxnFailed`: this transaction did not commit (a send failed, the broker aborted it on
  its timeout, the coordinator moved...): abort it and send its events again.
Any other exception from `make_txn_producer` means Kafka cannot be used now.

`InMemoryTxnBroker` is the twin the unit tests run the real relay loop on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kafka.errors import KafkaError

from outbox.errors import ConfigError
from outbox.event import KafkaHeaders
from outbox.publisher import (
    Delivery,
    FailedDelivery,
    KafkaSettings,
    Record,
    kafka_python_options,
)


class Fenced(Exception):
    """A newer producer initialized this transactional id: this one may send no more."""


class TxnFailed(Exception):
    """The transaction did not commit; abort it (if still open) and send it again."""


class OpenTransaction(TxnFailed):
    """A shard's progress partition has a transaction open that its own transactional
    id does not account for (outbox.progress): the shard cannot be taken now."""


class TxnProducer(Protocol):
    transactional_id: str

    def begin(self) -> None: ...

    def send(self, topic: str, key: bytes, value: bytes, headers: KafkaHeaders,
             partition: int | None = None) -> Delivery: ...

    def flush(self, timeout: float) -> None:
        """Wait (at most `timeout` s) for Kafka's answer to every record sent."""

    def commit(self, timeout: float) -> None:
        """Flush and commit; `TxnFailed` or `Fenced` if it did not commit."""

    def abort(self, timeout: float) -> None: ...

    def close(self, timeout: float) -> None: ...


TxnProducerFactory = Callable[[str], TxnProducer]

_FENCED_NAMES = {"ProducerFencedError", "InvalidProducerEpochError", "_FENCED",
                 "PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH"}


def is_fenced(error: BaseException) -> bool:
    """A record's error that means a newer producer holds the id (kafka-python's error
    class, or librdkafka's error name)."""
    return isinstance(error, Fenced) or type(error).__name__ in _FENCED_NAMES or \
        getattr(error, "kind", None) in _FENCED_NAMES


def make_txn_producer(client: str, settings: KafkaSettings, transactional_id: str,
                      transaction_timeout_ms: int) -> TxnProducer:
    if client == "kafka-python":
        return KafkaTxnProducer(settings, transactional_id, transaction_timeout_ms)
    if client == "confluent":
        from outbox.confluent import ConfluentTxnProducer

        return ConfluentTxnProducer(settings, transactional_id, transaction_timeout_ms)
    raise ValueError(f"unknown Kafka client {client!r}")


_FENCED = {"ProducerFencedError", "InvalidProducerEpochError", "InvalidPidMappingError",
           "TransactionalIdAuthorizationFailedError"}


def _kafka_python_error(exc: BaseException) -> BaseException:
    name = type(exc).__name__
    if name == "TransactionalIdAuthorizationFailedError":
        return ConfigError(f"Kafka refused the transactional id ({exc}): grant the relay's "
                           "principal WRITE and DESCRIBE on transactional ids "
                           "outbox-<prefix>-shard-*")
    if name in _FENCED:
        return Fenced(f"{name}: {exc}")
    return TxnFailed(f"{name}: {exc}")


class KafkaTxnProducer:
    """kafka-python's transactional producer (idempotent, acks=all, as for the relay)."""

    def __init__(self, settings: KafkaSettings, transactional_id: str,
                 transaction_timeout_ms: int) -> None:
        from kafka import KafkaProducer

        extra = {k: v for k, v in settings.extra.items()
                 if k not in ("enable_idempotence", "acks", "transactional_id")}
        self.transactional_id = transactional_id
        self._producer = KafkaProducer(
            client_id=f"{settings.client_id}-{transactional_id}"[:200],
            transactional_id=transactional_id,
            transaction_timeout_ms=transaction_timeout_ms,
            **kafka_python_options(settings), **extra)
        try:
            self._producer.init_transactions()  # bounded by max_block_ms
        except KafkaError as exc:
            self._producer.close(timeout=1)
            raise _kafka_python_error(exc) from exc

    def begin(self) -> None:
        try:
            self._producer.begin_transaction()
        except KafkaError as exc:
            raise _kafka_python_error(exc) from exc

    def send(self, topic: str, key: bytes, value: bytes, headers: KafkaHeaders,
             partition: int | None = None) -> Delivery:
        from outbox.publisher import _KafkaDelivery

        try:
            return _KafkaDelivery(self._producer.send(topic, value=value, key=key,
                                                      headers=headers, partition=partition))
        except KafkaError as exc:
            return FailedDelivery(exc)

    def flush(self, timeout: float) -> None:
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as exc:
            raise _kafka_python_error(exc) from exc

    def commit(self, timeout: float) -> None:
        self._bounded(self._producer.commit_transaction, timeout)

    def abort(self, timeout: float) -> None:
        self._bounded(self._producer.abort_transaction, timeout)

    def _bounded(self, call: Callable[[], None], timeout: float) -> None:
        """kafka-python's commit and abort wait without a bound (a broker that is down
        would hold the relay for good): wait for them on a helper thread, at most
        `timeout` seconds. Past it the producer is given up (the caller drops it)."""
        failure: list[BaseException] = []

        def run() -> None:
            try:
                call()
            except BaseException as exc:
                failure.append(exc)

        helper = threading.Thread(target=run, daemon=True, name="outbox-txn")
        helper.start()
        helper.join(timeout)
        if helper.is_alive():
            raise TxnFailed(f"Kafka did not answer within {timeout:g}s")
        if failure:
            if isinstance(failure[0], KafkaError):
                raise _kafka_python_error(failure[0]) from failure[0]
            raise failure[0]

    def close(self, timeout: float) -> None:
        """Never raises: a fenced or failed producer is being thrown away anyway."""
        with contextlib.suppress(Exception):
            self._producer.close(timeout=timeout)


# -- the in-memory twin ----------------------------------------------------------------


@dataclass
class _Id:
    epoch: int = 0
    open: list[Record] = field(default_factory=list)  # the open transaction's records


class InMemoryTxnBroker:
    """Kafka's transactions in memory: `committed` is what a read_committed consumer
    reads, in commit order; `producer(tid)` fences the id's older producers and aborts
    their open transaction, as init_transactions does. `fail(record)` may refuse sends."""

    def __init__(self, fail: Callable[[Record], BaseException | None] | None = None) -> None:
        self.committed: list[Record] = []
        self.aborted: list[Record] = []
        self.fail = fail
        self.before_commit: Callable[[str], None] = lambda tid: None  # a test's hook
        # True: commit the records that were taken even though one failed (as kafka-python
        # was seen to do); the caller must not rely on the commit to refuse.
        self.commit_despite_failures = False
        self._ids: dict[str, _Id] = {}
        self._lock = threading.Lock()

    def producer(self, transactional_id: str) -> InMemoryTxnProducer:
        with self._lock:
            state = self._ids.setdefault(transactional_id, _Id())
            state.epoch += 1
            self.aborted.extend(state.open)
            state.open = []
            return InMemoryTxnProducer(self, transactional_id, state.epoch)

    def event_ids(self) -> list[str]:
        return [dict(r.headers)["ce_id"].decode() for r in self.committed
                if "ce_id" in dict(r.headers)]

    def _state(self, tid: str, epoch: int) -> _Id:
        state = self._ids[tid]
        if state.epoch != epoch:
            raise Fenced(f"transactional id {tid} has epoch {state.epoch}, not {epoch}")
        return state


class InMemoryTxnProducer:
    def __init__(self, broker: InMemoryTxnBroker, transactional_id: str, epoch: int) -> None:
        self.broker = broker
        self.transactional_id = transactional_id
        self.epoch = epoch
        self._failed: BaseException | None = None

    def begin(self) -> None:
        with self.broker._lock:
            self.broker._state(self.transactional_id, self.epoch).open = []
        self._failed = None

    def send(self, topic: str, key: bytes, value: bytes, headers: KafkaHeaders,
             partition: int | None = None) -> Delivery:
        record = Record(topic, key, value, list(headers), partition)
        error = self.broker.fail(record) if self.broker.fail else None
        if error is not None:
            self._failed = self._failed or error
            return FailedDelivery(error)
        with self.broker._lock:
            self.broker._state(self.transactional_id, self.epoch).open.append(record)
        from outbox.publisher import _DELIVERED

        return _DELIVERED

    def flush(self, timeout: float) -> None:
        return None

    def commit(self, timeout: float) -> None:
        self.broker.before_commit(self.transactional_id)
        with self.broker._lock:
            state = self.broker._state(self.transactional_id, self.epoch)
            if self._failed is not None and not self.broker.commit_despite_failures:
                raise TxnFailed(f"a send failed: {self._failed}")
            self.broker.committed.extend(state.open)
            state.open = []

    def abort(self, timeout: float) -> None:
        with self.broker._lock:
            state = self.broker._state(self.transactional_id, self.epoch)
            self.broker.aborted.extend(state.open)
            state.open = []
        self._failed = None

    def close(self, timeout: float) -> None:
        return None

