"""Tell a permanent misconfiguration from an outage.

A relay or consumer that meets an outage (database restarting, broker down, network cut)
retries with backoff. Some failures never heal by waiting: missing tables, a wrong
password, a database that does not exist, a compression library that is not installed,
an option the Kafka client does not know. Retrying those forever looks like an outage
and hides the mistake; `permanent_reason` names them so the process can stop and say so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from outbox.errors import ConfigError

# SQLSTATEs that waiting does not fix.
_SQLSTATE_REASONS = {
    "42P01": "the outbox tables are missing ({msg}): run `outbox db upgrade` on this "
             "database, with the same --table-prefix",
    "42703": "the outbox tables are older than this version ({msg}): run `outbox db upgrade`",
    "28P01": "database authentication failed ({msg}): check the user name and password "
             "in the database URL",
    "28000": "database authentication failed ({msg}): check the user name, password and "
             "the server's pg_hba.conf",
    "3D000": "the database does not exist ({msg}): check the database name in the URL",
    "42501": "permission denied ({msg}): grant the role what it needs (docs/production.md, "
             "'Least privilege')",
}

# libpq reports connection-time failures without a SQLSTATE: match its messages.
_CONNECT_REASONS = [
    (re.compile(r"password authentication failed|authentication failed for user|"
                r"no password supplied|no pg_hba\.conf entry", re.I), "28P01"),
    (re.compile(r'database "[^"]*" does not exist', re.I), "3D000"),
    (re.compile(r'role "[^"]*" does not exist', re.I), "28000"),
]

# kafka-python's codec names -> the package a user installs.
COMPRESSION_PACKAGES = {"snappy": "python-snappy", "lz4": "lz4", "zstd": "zstandard"}
_CODEC_MISSING = re.compile(r"Libraries for (\w+) compression codec not found")
_UNKNOWN_OPTIONS = re.compile(r"Unrecognized configs: (.*)")


def permanent_reason(exc: BaseException) -> str | None:
    """Why `exc` will not heal by waiting, as one line for a human; None if it may.

    Looks through the exception's causes and SQLAlchemy's wrapped driver error, so the
    same call serves psycopg, SQLAlchemy and kafka-python errors. None (retry with
    backoff) for anything not known to be permanent: an unreachable server, a timeout,
    a lost connection, a broker without a leader.
    """
    for err in _chain(exc):
        if isinstance(err, ConfigError):
            return str(err)
        msg = _first_line(err)
        sqlstate = getattr(err, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate in _SQLSTATE_REASONS:
            return _SQLSTATE_REASONS[sqlstate].format(msg=msg)
        if _is_psycopg_operational(err):
            for pattern, state in _CONNECT_REASONS:
                if pattern.search(str(err)):
                    return _SQLSTATE_REASONS[state].format(msg=_strip_connect_prefix(msg))
        codec = _CODEC_MISSING.search(str(err))
        if codec:
            name = codec.group(1)
            package = COMPRESSION_PACKAGES.get(name, name)
            return (f"compression {name!r} needs the Python package {package!r}, which is "
                    f"not installed: pip install {package}, or choose another --compression")
        unknown = _UNKNOWN_OPTIONS.search(str(err))
        if unknown and isinstance(err, ValueError):
            # Names only: the values may be credentials.
            names = re.findall(r"""['"]([^'"]+)['"]\s*:""", unknown.group(1))
            return ("the Kafka client does not know the option(s) "
                    f"{', '.join(names) or '(unnamed)'}: check their spelling")
        if type(err).__name__ == "KafkaConfigurationError" or \
                "disabled idempotence" in str(err):
            return f"the Kafka client configuration is contradictory: {msg}"
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """exc, the driver error SQLAlchemy wraps, and the causes, each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        err = todo.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        for nxt in (getattr(err, "orig", None), err.__cause__, err.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _is_psycopg_operational(err: BaseException) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(err, psycopg.OperationalError)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _strip_connect_prefix(msg: str) -> str:
    """'connection failed: connection to server at ... failed: FATAL:  x' -> 'x'."""
    return re.sub(r"^.*?FATAL:\s+", "", msg)
