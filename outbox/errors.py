"""Every error the outbox raises on purpose; each message names the problem."""


class OutboxError(Exception):
    """Base class of the outbox's own errors."""


class PublishError(OutboxError, ValueError):
    """publish() refused an event; nothing was written and the session is still usable."""


class PayloadNotSerializable(PublishError, TypeError):
    """The serializer cannot encode the payload."""


class PayloadTooLarge(PublishError):
    """The encoded event is larger than the configured limit."""


class InvalidTopic(PublishError):
    """Kafka would refuse the topic name."""


class InvalidKey(PublishError, TypeError):
    """The event key is not a str, or holds a NUL or a lone surrogate."""


class InvalidHeader(PublishError, TypeError):
    """A header name or value (or the event type) has the wrong type, is reserved, or
    holds text that cannot be stored or sent (a NUL in the type, a lone surrogate)."""


class InvalidSession(PublishError, TypeError):
    """publish() was given something other than a Session or AsyncSession (or a scoped
    one), or a session it cannot attach the event to."""


class ConfigError(OutboxError, ValueError):
    """A configuration value (table prefix, shard count, URL...) is invalid."""


class MalformedRecord(OutboxError, ValueError):
    """A Kafka record cannot be turned into an Event (no id, undecodable payload)."""
