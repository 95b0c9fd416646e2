"""Log lines for people (text, the default) or for log pipelines (`--log-format json`:
one JSON object per line).

The outbox's own lines pass what they are about as fields (`extra=fields(...)`): the
relay or consumer id, the event id, shard, topic, partition, offset and attempt. Text
lines say them in the sentence as before; JSON lines also carry them as keys, so a
pipeline can filter on `event_id` without parsing English.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

# the keys a JSON line may carry besides time, level, logger and message
FIELDS = ("relay_id", "consumer_group", "consumer_id", "event_id", "shard", "shards",
          "topic", "partition", "offset", "attempt")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: the given fields, without the ones that are None."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"not log fields: {sorted(unknown)}")
    return {k: v for k, v in values.items() if v is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the
    outbox's fields present on the record, and `error` with the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value if isinstance(value, int | float | str | bool | list) \
                    else str(value)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str, fmt: str = "text") -> logging.Handler | None:
    """Log to stderr at `level`, in the chosen format, as `logging.basicConfig` would:
    only when the root logger has no handler yet (an application or a test runner
    that set up logging keeps its own). Returns the handler made, if one was."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    root = logging.getLogger()
    if root.handlers:
        return None
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
