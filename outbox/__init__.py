"""transactional-outbox: write rows and events in one transaction; relay them to Kafka."""

from outbox.consumer import (
    AsyncIdempotentConsumer,
    ConsumerConfig,
    ConsumerRunner,
    IdempotentConsumer,
    idempotent_consumer,
)
from outbox.errors import (
    ConfigError,
    InvalidHeader,
    InvalidKey,
    InvalidSession,
    InvalidTopic,
    MalformedRecord,
    OutboxError,
    PayloadNotSerializable,
    PayloadTooLarge,
    PublishError,
)
from outbox.event import Event, uuid7
from outbox.serde import BytesSerializer, JsonSerializer, Serializer
from outbox.writer import Outbox

__all__ = [
    "AsyncIdempotentConsumer",
    "BytesSerializer",
    "ConfigError",
    "ConsumerConfig",
    "ConsumerRunner",
    "Event",
    "IdempotentConsumer",
    "InvalidHeader",
    "InvalidKey",
    "InvalidSession",
    "InvalidTopic",
    "JsonSerializer",
    "MalformedRecord",
    "Outbox",
    "OutboxError",
    "PayloadNotSerializable",
    "PayloadTooLarge",
    "PublishError",
    "Serializer",
    "idempotent_consumer",
    "uuid7",
]
