"""The consumer's pieces that need no servers: declaration, loading, the CLI's refusals,
dead-letter headers, metrics, and the kafka-python source's use of its client (fakes)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox import ConfigError, Event, IdempotentConsumer, idempotent_consumer
from outbox.cli import main
from outbox.consumer import (
    ConsumerRunner,
    FunctionConsumer,
    HandlerMisuse,
    TopicPartition,
    consumer,
    dead_letter_headers,
    load_consumer,
    truncated_dead_letter,
)
from outbox.metrics import ConsumerMetrics

DB = "postgresql://u:secret@127.0.0.1:1/nowhere"


class Projector(IdempotentConsumer):
    topics = ("orders",)
    group_id = "projector"

    def handle(self, event: Event, session: Session) -> None:
        pass


projector = Projector()


@consumer(topics=["orders"], group_id="fn", max_attempts=2, external=True)
def on_order(event: Event, session: Session) -> None:
    """Project an order."""


def plain(event: Event, session: Session) -> None:
    pass


class Broken(IdempotentConsumer):
    topics = ("orders",)
    group_id = "broken"

    def __init__(self) -> None:
        raise RuntimeError("needs arguments")


# -- declaring consumers -----------------------------------------------------------------

def test_the_decorator_makes_a_consumer_that_is_still_the_function() -> None:
    assert isinstance(on_order, FunctionConsumer) and isinstance(on_order, IdempotentConsumer)
    assert on_order.topics == ["orders"] and on_order.group_id == "fn"
    assert on_order.max_attempts == 2 and on_order.external is True
    assert on_order.retry_backoff == IdempotentConsumer.retry_backoff  # defaults kept
    assert on_order.__name__ == "on_order" and on_order.__doc__ == "Project an order."
    assert consumer is idempotent_consumer
    seen: list[object] = []

    @consumer(topics=["t"], group_id="g")
    def record(event: Event, session: Session) -> None:
        seen.append(event)

    record("e", "s")  # type: ignore[arg-type]
    record.handle("e2", "s")  # type: ignore[arg-type]
    assert seen == ["e", "e2"]


def test_the_decorator_refuses_unknown_options_and_a_str_of_topics() -> None:
    with pytest.raises(TypeError, match=r"unknown consumer option.*retries"):
        consumer(topics=["t"], group_id="g", retries=3)
    with pytest.raises(ConfigError, match="list of topic names"):
        consumer(topics="orders", group_id="g")


@pytest.mark.parametrize(("attrs", "message"), [
    ({"topics": ()}, "topics must be a non-empty list"),
    ({"topics": "orders"}, "topics must be a non-empty list"),
    ({"topics": ["bad topic"]}, "invalid Kafka topic name"),
    ({"group_id": ""}, "group_id must be a non-empty str"),
    ({"max_attempts": 0}, "max_attempts must be an int >= 1"),
    ({"retry_backoff": -1}, "retry_backoff"),
    ({"id_header": ""}, "id_header"),
    ({"dlq_suffix": ""}, "dlq_suffix"),
    ({"inbox_retention": timedelta(0)}, "inbox_retention must be positive"),
])
def test_an_invalid_consumer_is_refused_with_what_is_wrong(attrs: dict[str, Any],
                                                           message: str) -> None:
    c = Projector()
    for k, v in attrs.items():
        setattr(c, k, v)
    with pytest.raises(ConfigError, match=message):
        c.validate()


def test_retention_takes_a_timedelta_or_seconds() -> None:
    c = Projector()
    assert c.retention_seconds == 7 * 86400
    c.inbox_retention = 60
    assert c.retention_seconds == 60


def test_the_group_id_can_come_from_the_runner() -> None:
    c = Projector()
    c.group_id = ""
    with pytest.raises(ConfigError):
        c.validate()
    c.validate(group_id="from-cli")
    runner = ConsumerRunner(c, db_url=DB, kafka="k:1", group_id="from-cli")
    try:
        assert runner.group_id == "from-cli"
    finally:
        runner.close()


def test_the_runner_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError, match="db_url, engine or session_factory"):
        ConsumerRunner(projector, kafka="k:1")
    with pytest.raises(ConfigError, match="enable_auto_commit"):
        ConsumerRunner(projector, db_url=DB, kafka="k:1",
                       kafka_config={"enable_auto_commit": True})
    with pytest.raises(ConfigError, match="not an IdempotentConsumer"):
        ConsumerRunner(plain, db_url=DB, kafka="k:1")  # type: ignore[arg-type]
    runner = ConsumerRunner(Projector, db_url=DB, kafka="k:1")  # a class is instantiated
    try:
        assert isinstance(runner.consumer, Projector)
    finally:
        runner.close()


# -- loading a target --------------------------------------------------------------------

def test_load_consumer_takes_a_class_an_instance_or_a_decorated_function() -> None:
    assert isinstance(load_consumer("tests.unit.test_consumer:Projector"), Projector)
    assert load_consumer("tests.unit.test_consumer:projector") is projector
    assert load_consumer("tests.unit.test_consumer:on_order") is on_order


@pytest.mark.parametrize(("target", "message"), [
    ("tests.unit.test_consumer", "not of the form package.module:ClassName"),
    ("tests.unit.no_such_module:X", "cannot import module 'tests.unit.no_such_module'"),
    ("tests.unit.test_consumer:Missing", "has no attribute 'Missing'"),
    ("tests.unit.test_consumer:plain", "the undecorated callable 'plain'"),
    ("tests.unit.test_consumer:DB", "a str, not an IdempotentConsumer"),
    ("tests.unit.test_consumer:ConsumerRunner", "the class ConsumerRunner"),
    ("tests.unit.test_consumer:Broken", "cannot instantiate .*needs arguments"),
])
def test_load_consumer_explains_what_it_cannot_use(target: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_consumer(target)


@pytest.mark.parametrize(("target", "message"), [
    ("tests.unit.test_consumer:plain", "not an IdempotentConsumer"),
    ("tests.unit.nope:X", "cannot import module"),
    ("nocolon", "package.module:ClassName"),
])
def test_the_cli_refuses_a_target_with_a_clear_error(target: str, message: str) -> None:
    result = CliRunner().invoke(main, ["consume", target, "--db", DB, "--kafka", "k:1"])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_the_cli_reads_its_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    made: dict[str, Any] = {}

    class FakeRunner:
        def __init__(self, handler: Any, **kw: Any) -> None:
            made.update(kw, handler=handler)

        def install_signal_handlers(self) -> None:
            made["signals"] = True

        def run(self) -> None:
            made["ran"] = True

        def healthy(self) -> bool:
            return True

    monkeypatch.setattr("outbox.consumer.ConsumerRunner", FakeRunner)
    env = {"OUTBOX_DATABASE_URL": DB, "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9",
           "OUTBOX_GROUP_ID": "env-group", "OUTBOX_MAX_POLL_RECORDS": "42",
           "OUTBOX_KAFKA_SESSION_TIMEOUT_MS": "6000", "OUTBOX_TABLE_PREFIX": "box",
           "OUTBOX_CONSUMER": "tests.unit.test_consumer:on_order"}
    result = CliRunner().invoke(main, ["consume"], env=env)
    assert result.exit_code == 0, result.output
    assert made["handler"] is on_order and made["ran"] and made["signals"]
    # the CLI may name psycopg as the driver (the consumer runs on it): same database
    url = make_url(made["db_url"]).set(drivername="postgresql")
    assert (url.render_as_string(hide_password=False), made["kafka"], made["group_id"],
            made["max_poll_records"],
            made["session_timeout_ms"], made["table_prefix"]) == (
        DB, "k:9", "env-group", 42, 6000, "box")


# -- dead letters and metrics ------------------------------------------------------------

def test_dead_letter_headers_keep_the_original_and_replace_earlier_outbox_ones() -> None:
    original = [("ce_id", b"id-1"), ("outbox_reason", b"malformed"), ("trace", None),
                ("outbox_error", b"old")]
    got = dead_letter_headers(original, topic="orders", partition=2, offset=41,  # type: ignore[arg-type]
                              reason="handler-failed", error="ValueError: " + "x" * 5000)
    assert got[:2] == [("ce_id", b"id-1"), ("trace", b"")]
    extra = dict(got[2:])
    assert extra["outbox_original_topic"] == b"orders"
    assert extra["outbox_original_partition"] == b"2"
    assert extra["outbox_original_offset"] == b"41"
    assert extra["outbox_reason"] == b"handler-failed"
    assert extra["outbox_error"].startswith(b"ValueError: x") and len(extra["outbox_error"]) == 4000
    assert [k for k, _ in got].count("outbox_reason") == 1


def test_a_truncated_dead_letter_copy_is_small_and_keeps_the_origin() -> None:
    whole = dead_letter_headers(
        [("ce_id", b"id-1"), ("trace", b"t" * 5000), ("tenant", b"eu"),
         ("outbox_truncated", b"stale")],
        topic="orders", partition=2, offset=41, reason="handler-failed",
        error="ValueError: " + "x" * 5000)
    key, value, headers = truncated_dead_letter(b"k" * 3000, b"v" * 2_000_000, whole)
    got = dict(headers)
    assert value == b"" and key == b"k" * 1024
    assert got["outbox_truncated"] == b"value,key,headers"
    # key + value + the original headers kept by dead_letter_headers
    assert int(got["outbox_original_size"]) == 3000 + 2_000_000 + 5 + 4 + 5 + 5000 + 6 + 2
    assert (got["outbox_original_topic"], got["outbox_original_partition"],
            got["outbox_original_offset"], got["outbox_reason"]) == (
        b"orders", b"2", b"41", b"handler-failed")
    assert got["ce_id"] == b"id-1" and got["tenant"] == b"eu" and "trace" not in got
    assert [k for k, _ in headers].count("outbox_truncated") == 1
    size = len(key) + len(value) + sum(len(k) + len(v) for k, v in headers)
    assert size < 8 * 1024, size  # whatever the original's size

    # small key and headers: only the value goes
    key, value, headers = truncated_dead_letter(None, b"v" * 10, whole[:1] + whole[2:])
    assert key is None and value == b"" and dict(headers)["outbox_truncated"] == b"value"


def test_consumer_metrics_count_and_track_lag_per_partition() -> None:
    registry = CollectorRegistry()
    m = ConsumerMetrics(registry)
    m.batch(0.01, processed=5, duplicates=2, dead_reasons=["malformed", "handler-failed",
                                                           "malformed"])
    m.failed()
    m.lag({("t", 0): 3, ("t", 1): 0})
    m.lag({("t", 1): 7})

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("outbox_consumer_processed_total") == 5
    assert value("outbox_consumer_duplicates_skipped_total") == 2
    assert value("outbox_consumer_failed_total") == 1
    assert value("outbox_consumer_dead_lettered_total", reason="malformed") == 2
    assert value("outbox_consumer_dead_lettered_total", reason="handler-failed") == 1
    assert value("outbox_consumer_lag", topic="t", partition="0") is None  # no longer ours
    assert value("outbox_consumer_lag", topic="t", partition="1") == 7
    m.forget("t", 1)
    assert value("outbox_consumer_lag", topic="t", partition="1") is None
    off = ConsumerMetrics(None)  # without a registry everything is a no-op
    off.batch(1, 1, 1, ["x"])
    off.failed()
    off.lag({("t", 0): 1})
    off.forget("t", 0)


# -- holding a partition back on kafka-python (fakes) ------------------------------------

class _PublicOnly:
    """A KafkaConsumer stand-in that fails any use of a private attribute: the source
    must not depend on kafka-python's internals (its paused-records bookkeeping)."""

    def __init__(self, batches: list[dict[Any, list[Any]]]) -> None:
        self.batches = batches
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the source used the client's attribute {name!r}")

    def poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        self.calls.append(("poll", max_records))
        return self.batches.pop(0) if self.batches else {}

    def pause(self, tp: Any) -> None:
        self.calls.append(("pause", tuple(tp)))

    def resume(self, tp: Any) -> None:
        self.calls.append(("resume", tuple(tp)))

    def seek(self, tp: Any, offset: int) -> None:
        self.calls.append(("seek", (*tuple(tp), offset)))


class _Rec:
    def __init__(self, partition: int, offset: int) -> None:
        self.topic, self.partition, self.offset = "t", partition, offset


def test_the_kafka_source_drains_the_client_before_it_pauses_and_uses_only_its_public_api(
) -> None:
    """kafka-python parks the parsed records of a partition paused while they are next in
    line, and may never give them back (the bug the consumer used to work around through
    two private attributes). The source takes everything the client buffered on each
    poll, so none is left in line when it pauses; it hands records out itself."""
    from kafka.structs import TopicPartition as KafkaTP

    from outbox.consumer.config import ConsumerConfig
    from outbox.consumer.kafka_source import DRAIN, KafkaPythonSource

    t0, t1 = KafkaTP("t", 0), KafkaTP("t", 1)
    fake = _PublicOnly([{t0: [_Rec(0, o) for o in range(5)], t1: [_Rec(1, 0)]}])
    source = KafkaPythonSource(ConsumerConfig(kafka="k:1", max_poll_records=3), "g")
    source.client = fake
    got = source.poll(0.1, max_records=3)
    assert fake.calls == [("poll", DRAIN)]  # everything the client had, in one call
    assert sum(len(v) for v in got.values()) == 3
    tp0 = TopicPartition("t", 0)
    source.seek(tp0, 1)  # a hold at offset 1: back there, and paused
    source.pause(tp0)
    assert fake.calls[-2:] == [("seek", ("t", 0, 1)), ("pause", ("t", 0))]
    rest = source.poll(0.1, max_records=10)  # the held partition's buffer is gone
    assert all(tp.partition == 1 for tp in rest)
    source.resume(tp0)
    assert fake.calls[-1] == ("resume", ("t", 0))


# -- nothing left to kafka-python's __del__ at exit (fakes) ------------------------------

def test_a_kafka_consumer_whose_subscribe_fails_is_closed(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import kafka
    from kafka.errors import KafkaError

    made: list[Any] = []

    class Refusing:
        def __init__(self, **config: Any) -> None:
            self.closed = False
            made.append(self)

        def subscribe(self, **kw: Any) -> None:
            raise KafkaError("metadata refused")

        def close(self, **kw: Any) -> None:
            self.closed = True

    monkeypatch.setattr(kafka, "KafkaConsumer", Refusing)
    runner = ConsumerRunner(projector, db_url=DB, kafka="k:1")
    try:
        with pytest.raises(Exception, match="Kafka unavailable"):
            runner.run_once()
        assert len(made) == 1 and made[0].closed and runner.source is None
    finally:
        runner.close()


def test_close_closes_the_dead_letter_producer_even_if_the_consumer_fails_to_close() -> None:
    closed: list[str] = []

    class Failing:
        def close(self, **kw: Any) -> None:
            closed.append("consumer")
            raise RuntimeError("already broken")

    class Producer:
        def close(self, **kw: Any) -> None:
            closed.append("producer")

    runner = ConsumerRunner(projector, db_url=DB, kafka="k:1")
    runner.source, runner.dead_letters.publisher = Failing(), Producer()  # type: ignore[assignment]
    runner.close()
    assert closed == ["consumer", "producer"]
    assert runner.source is None and runner.dead_letters.publisher is None


def test_a_kafka_option_the_client_does_not_know_stops_the_runner_instead_of_retrying(
) -> None:
    runner = ConsumerRunner(projector, db_url=DB, kafka="127.0.0.1:1",
                            kafka_config={"bogus_option": 1})
    try:
        with pytest.raises(ConfigError, match="bogus_option"):
            runner.run_once()
    finally:
        runner.close()


@pytest.mark.parametrize("error", [
    HandlerMisuse("Projector.handle called session.commit() on event e1 (t[0] offset 3)"),
    ConfigError("consumer g cannot run: the outbox tables are missing (x)"),
])
def test_the_cli_ends_with_one_line_when_the_runner_stops_on_an_error(
    error: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    class StoppingRunner:
        def __init__(self, handler: Any, **kw: Any) -> None:
            pass

        def install_signal_handlers(self) -> None:
            pass

        def run(self) -> None:
            raise error

    monkeypatch.setattr("outbox.consumer.ConsumerRunner", StoppingRunner)
    monkeypatch.setattr("outbox.cli._preflight", lambda *a, **kw: None, raising=False)
    result = CliRunner().invoke(main, ["consume", "tests.unit.test_consumer:on_order",
                                       "--db", DB, "--kafka", "k:9"])
    assert result.exit_code == 1
    assert result.output == f"Error: {error}\n"
    assert isinstance(result.exception, SystemExit)
