"""The idempotent consumer: exactly-once effects from at-least-once delivery.

    class Projector(IdempotentConsumer):
        topics = ["orders"]
        group_id = "order-projector"

        def handle(self, event: Event, session: Session) -> None:
            session.execute(...)            # the effects, in the batch's transaction

    runner = ConsumerRunner(Projector(), db_url=URL, kafka="localhost:9092")
    runner.install_signal_handlers()
    runner.run()                            # `outbox consume pkg.mod:Projector` does this

The parts, one job each:

- `source`: the transport seam, `RecordSource` (poll, seek, pause, resume, commit,
  rebalance callbacks, lag); kafka-python (`kafka_source`), confluent-kafka
  (`confluent_source`) and in-memory (`memory`, exported by `outbox.testing`) ones;
- `partitions`: each partition's state (running -> held until t -> running; revoked
  partitions are forgotten);
- `applier` (and `external`): one poll batch in one database transaction -- the dedupe
  claim, the fast path, the savepoint redo, attempts counted in the database;
- `inbox`: the consumer's SQL (`<prefix>_inbox`, `<prefix>_attempts`);
- `deadletter` and `finish`: dead-letter copies after the commit, then the offsets;
- `calls` and `watchdog`: the guarded handler call, hang reports, `handler_timeout`,
  the shutdown grace;
- `config`: ConsumerConfig; `api`: the consumer classes and `load_consumer`;
- `runner`: ConsumerRunner, which only composes them.

One poll batch is one database transaction; only after it committed are the dead-letter
copies sent (each waited for) and then the Kafka offsets committed. A crash before the
commit loses effects and dedupe records together; a crash between the commit and the
offset commit redelivers records whose dedupe records exist, so they are skipped.
Processing happens between polls, so a rebalance never takes a partition away mid-batch.

A failing event is retried with backoff, holding back only its own partition; its
attempts are counted in the database, so after `max_attempts` in total -- across
restarts, crashes and rebalances -- it goes to `<topic><dlq_suffix>` and the partition
moves on. What stops the runner instead of being retried: a handler that commits, rolls
back or closes the session (HandlerMisuse, raised before anything of the batch is
committed), and a database error that waiting cannot heal (ConfigError).
"""

from outbox.consumer.api import (
    AnyConsumer,
    AsyncFunctionConsumer,
    AsyncIdempotentConsumer,
    ConsumerBase,
    FunctionConsumer,
    IdempotentConsumer,
    idempotent_consumer,
    load_consumer,
)
from outbox.consumer.calls import HandlerMisuse, HandlerTimeout
from outbox.consumer.config import DLQ_MAX_REQUEST_BYTES, ConsumerConfig
from outbox.consumer.deadletter import (
    DLQ_HEADERS,
    REASON_FAILED,
    REASON_MALFORMED,
    dead_letter_headers,
    truncated_dead_letter,
)
from outbox.consumer.outcome import RETRY_BACKOFF_MAX
from outbox.consumer.runner import ConsumerRunner, ConsumerStats
from outbox.consumer.source import (
    CLIENTS,
    CommitFailed,
    CommitRefused,
    RecordSource,
    SourceUnavailable,
    TopicPartition,
)
from outbox.consumer.watchdog import EXIT_HANDLER_TIMEOUT, EXIT_NOT_STOPPED

#: `from outbox.consumer import consumer` (the package exports it as `idempotent_consumer`,
#: because `outbox.consumer` is this package's name).
consumer = idempotent_consumer

__all__ = [
    "CLIENTS",
    "DLQ_HEADERS",
    "DLQ_MAX_REQUEST_BYTES",
    "EXIT_HANDLER_TIMEOUT",
    "EXIT_NOT_STOPPED",
    "REASON_FAILED",
    "REASON_MALFORMED",
    "RETRY_BACKOFF_MAX",
    "AnyConsumer",
    "AsyncFunctionConsumer",
    "AsyncIdempotentConsumer",
    "CommitFailed",
    "CommitRefused",
    "ConsumerBase",
    "ConsumerConfig",
    "ConsumerRunner",
    "ConsumerStats",
    "FunctionConsumer",
    "HandlerMisuse",
    "HandlerTimeout",
    "IdempotentConsumer",
    "RecordSource",
    "SourceUnavailable",
    "TopicPartition",
    "consumer",
    "dead_letter_headers",
    "idempotent_consumer",
    "load_consumer",
    "truncated_dead_letter",
]
