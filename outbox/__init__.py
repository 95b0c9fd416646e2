"""transactional-outbox: write rows and events in one transaction; relay them to Kafka."""

#: The release, in one place: the wheel's metadata (setuptools reads it from here, see
#: pyproject.toml) and `outbox --version` both show it. docs/versioning.md says what a
#: change of each part means.
__version__ = "0.1.0"

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
    "__version__",
    "idempotent_consumer",
    "uuid7",
]
