"""The `outbox` command. Every option also reads an OUTBOX_* environment variable.

A condition the user can cause (a bad URL or setting, an unmigrated database, a wrong
password, a missing library, a port in use) ends the command with one clear line and a
non-zero exit, never a Python traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from outbox import __version__
from outbox.dburl import mask
from outbox.errors import ConfigError
from outbox.logs import FORMATS, configure
from outbox.schema import DEFAULT_PREFIX

log = logging.getLogger("outbox.cli")


def _checked_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a URL that does not parse cleanly before anything connects (see dburl.parse)."""
    from outbox.dburl import parse

    if value is not None:
        try:
            parse(value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _postgresql_url(ctx: click.Context, param: click.Parameter,
                    value: str | None) -> str | None:
    """As _checked_url, for the commands that need PostgreSQL (not SQLite)."""
    from outbox.dburl import require_postgresql

    if value is not None:
        command = " ".join(c.info_name or "" for c in _lineage(ctx)[1:])
        try:
            require_postgresql(value, f"`outbox {command}`")
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _lineage(ctx: click.Context) -> list[click.Context]:
    chain = [ctx]
    while chain[0].parent is not None:
        chain.insert(0, chain[0].parent)
    return chain


def _checked_prefix(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from outbox.schema import validate_prefix

    try:
        return validate_prefix(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


db_option = click.option(
    "--db", "db_url", envvar="OUTBOX_DATABASE_URL", required=True, show_envvar=True,
    callback=_checked_url,
    help="Database URL, e.g. postgresql://user:pass@host/db (percent-encode '@', ':', '/' "
         "and '%' in the password).",
)
pg_db_option = click.option(
    "--db", "db_url", envvar="OUTBOX_DATABASE_URL", required=True, show_envvar=True,
    callback=_postgresql_url,
    help="PostgreSQL URL, e.g. postgresql://user:pass@host/db (percent-encode '@', ':', '/' "
         "and '%' in the password).",
)
prefix_option = click.option(
    "--table-prefix", envvar="OUTBOX_TABLE_PREFIX", default=DEFAULT_PREFIX, show_default=True,
    show_envvar=True, callback=_checked_prefix, help="Prefix of the outbox's table names.",
)
kafka_option = click.option(
    "--kafka", "kafka", envvar="OUTBOX_KAFKA_BOOTSTRAP_SERVERS", required=True,
    show_envvar=True, help="Kafka bootstrap servers, HOST:PORT[,HOST:PORT...]",
)


gc_option = click.option(
    "--gc-tuning/--no-gc-tuning", envvar="OUTBOX_GC_TUNING", default=True, show_default=True,
    show_envvar=True,
    help="Freeze the startup heap and collect garbage less often (outbox.gctune): the "
         "collector cost the relay a third of its CPU without it.",
)
metrics_host_option = click.option(
    "--metrics-host", envvar="OUTBOX_METRICS_HOST", default="127.0.0.1", show_default=True,
    show_envvar=True,
    help="Address the metrics endpoint binds (it has no authentication; 0.0.0.0 for every "
         "interface).",
)


class _Main(click.Group):
    """The root group: an OutboxError a command lets through still ends in one line."""

    def invoke(self, ctx: click.Context) -> Any:
        from outbox.dburl import mask_text

        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise click.ClickException(mask_text(str(exc))) from None


@click.group(cls=_Main)
@click.version_option(__version__, "--version", prog_name="outbox",
                      message="%(prog)s, version %(version)s")
@click.option("--log-level", envvar="OUTBOX_LOG_LEVEL", default="INFO", show_envvar=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", envvar="OUTBOX_LOG_FORMAT", default="text", show_envvar=True,
              type=click.Choice(list(FORMATS), case_sensitive=False),
              help="json: one JSON object per line, with the event id, shard, partition, "
                   "attempt and relay or consumer id as fields.")
def main(log_level: str, log_format: str) -> None:
    """transactional-outbox: relay outbox events to Kafka, consume them once."""
    configure(log_level, log_format.lower())
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(KafkaClientLogLimit())


class KafkaClientLogLimit(logging.Filter):
    """kafka-python logs every reconnect attempt while a broker is down; let one line per
    logger and level through every `interval` seconds (ours are throttled already)."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, int], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("kafka"):
            return True
        import time

        key, now = (record.name, record.levelno), time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            return False
        self._last[key] = now
        return True


def _clean(exc: BaseException) -> str:
    """One line about `exc` for the user: what cannot heal by waiting named as such.

    URLs and DSN passwords in it are masked by parsing them, never by searching for the
    password's text (that garbles messages and gives short passwords away).
    """
    from outbox.dburl import mask_text
    from outbox.diagnose import permanent_reason

    text = str(exc).strip()
    return mask_text(permanent_reason(exc) or (text.splitlines()[0] if text
                                               else type(exc).__name__))


def _check_confluent() -> None:
    """`--client confluent` without the extra installed: say how to get it."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "--client confluent needs the confluent-kafka package: "
            "pip install 'transactional-outbox[confluent]'") from None


def _metrics_registry(port: int | None) -> Any:
    """A Prometheus registry when a metrics port is asked for (None otherwise)."""
    if not port:
        return None
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise click.ClickException(
            "--metrics-port needs prometheus-client, which is not installed: "
            "pip install 'transactional-outbox[metrics]'") from None
    return CollectorRegistry()


def _serve_metrics(port: int, host: str, registry: Any, healthy: Any) -> None:
    from outbox.metrics import serve

    try:
        serve(port, registry, healthy, host=host)
    except OSError as exc:  # port in use, no permission, unknown address
        raise click.ClickException(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None


def _preflight(db_url: str, table_prefix: str, what: str) -> None:
    """Connect once before the service loop: stop with the reason on what waiting cannot
    fix (authentication, a missing database or tables); a server that does not answer
    may be starting, so that is logged and left to the loop's backoff."""
    import psycopg

    from outbox.dburl import libpq_url
    from outbox.diagnose import permanent_reason
    from outbox.schema import make_tables

    tables = make_tables(table_prefix)
    needed = [tables.inbox, tables.attempts] if what == "consumer" else [
        tables.events, tables.dead_letters, tables.shards]
    try:
        with psycopg.connect(libpq_url(db_url), autocommit=True, connect_timeout=5) as conn:
            missing = [t.name for t in needed
                       if conn.execute("SELECT to_regclass(%s)", (t.name,)).fetchone()
                       == (None,)]
    except psycopg.Error as exc:
        reason = permanent_reason(exc)
        if reason:
            raise click.ClickException(
                f"{what} cannot start on {mask(db_url)}: {_clean(exc)}") from None
        log.warning("%s: database %s unreachable at startup (%s); it may still be "
                    "starting: retrying with backoff", what, mask(db_url), _clean(exc))
        return
    if missing:
        raise click.ClickException(
            f"{what} cannot start on {mask(db_url)}: the outbox tables are missing "
            f"({', '.join(missing)}): run `outbox db upgrade` on this database, with the same "
            "--table-prefix")




# The commands register themselves on `main` (imported last: they import it).
from outbox import cli_admin, cli_consume, cli_relay  # noqa: E402, F401

if __name__ == "__main__":
    # Run as a script, this module is __main__, and the commands registered themselves
    # on the imported outbox.cli's group: run that one.
    from outbox.cli import main as registered

    sys.exit(registered())
