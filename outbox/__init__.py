"""transactional-outbox: write rows and events in one transaction; relay them to Kafka."""

from outbox.errors import (
    ConfigError,
    InvalidHeader,
    InvalidKey,
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
    "BytesSerializer",
    "ConfigError",
    "Event",
    "InvalidHeader",
    "InvalidKey",
    "InvalidTopic",
    "JsonSerializer",
    "MalformedRecord",
    "Outbox",
    "OutboxError",
    "PayloadNotSerializable",
    "PayloadTooLarge",
    "PublishError",
    "Serializer",
    "uuid7",
]
