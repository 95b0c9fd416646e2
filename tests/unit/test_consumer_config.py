"""ConsumerConfig: every `outbox consume` flag has an OUTBOX_* variable and lands in the
runner's settings; settings that cannot work are refused by name."""

from __future__ import annotations

import dataclasses
from typing import Any

import click
import pytest
from click.testing import CliRunner

from outbox.cli import main
from outbox.consumer import ConsumerConfig, ConsumerRunner
from outbox.errors import ConfigError
from tests.unit.test_consumer import DB, Projector

#: flag parameter -> the runner keyword it becomes (None: the CLI's own)
CLI_ONLY = {"target", "metrics_port", "metrics_host", "gc_tuning"}
RENAMED = {"kafka_options": "kafka_config"}
VALUES = {
    "OUTBOX_CONSUMER": "tests.unit.test_consumer:on_order",
    "OUTBOX_DATABASE_URL": DB,
    "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9",
    "OUTBOX_TABLE_PREFIX": "box",
    "OUTBOX_GROUP_ID": "env-group",
    "OUTBOX_GC_TUNING": "false",
    "OUTBOX_MAX_POLL_RECORDS": "42",
    "OUTBOX_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "OUTBOX_KAFKA_CLIENT": "confluent",
    "OUTBOX_KAFKA_OPTIONS": "security.protocol=SSL fetch.min.bytes=1",
    "OUTBOX_GROUP_INSTANCE_ID": "pod-3",
    "OUTBOX_HANDLER_TIMEOUT": "12.5",
    "OUTBOX_IDLE_TX_TIMEOUT": "30",
    "OUTBOX_SHUTDOWN_GRACE": "4",
    "OUTBOX_METRICS_HOST": "127.0.0.1",
}
EXPECTED = {
    "kafka": "k:9", "table_prefix": "box", "group_id": "env-group", "max_poll_records": 42,
    "session_timeout_ms": 6000, "client": "confluent",
    "kafka_config": {"security.protocol": "SSL", "fetch.min.bytes": "1"},
    "group_instance_id": "pod-3", "handler_timeout": 12.5, "idle_tx_timeout": 30.0,
    "shutdown_grace": 4.0,
}


def test_every_consume_flag_reads_a_variable_and_reaches_the_runner(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    command = main.commands["consume"]
    options = {p.name: p for p in command.params if p.name}
    fields = {f.name for f in dataclasses.fields(ConsumerConfig)}
    for name, param in options.items():
        if name in CLI_ONLY:
            continue
        assert RENAMED.get(name, name) in fields, f"--{name} is not a ConsumerConfig field"
        assert isinstance(param.envvar, str) and param.envvar in VALUES, name
    assert isinstance(options["target"], click.Argument)
    made: dict[str, Any] = {}

    class FakeRunner:
        def __init__(self, handler: Any, **kw: Any) -> None:
            made.update(kw)

        def install_signal_handlers(self) -> None:
            pass

        def run(self) -> None:
            pass

    monkeypatch.setattr("outbox.consumer.ConsumerRunner", FakeRunner)
    monkeypatch.setattr("outbox.cli._preflight", lambda *a, **kw: None)
    result = CliRunner().invoke(main, ["consume"], env=VALUES)
    assert result.exit_code == 0, result.output
    assert {k: made[k] for k in EXPECTED} == EXPECTED
    # and every one of those is a setting the real runner accepts
    ConsumerConfig.of(**{k: made[k] for k in EXPECTED}).validate()


def test_zero_turns_the_timeouts_off() -> None:
    made: dict[str, Any] = {}

    class FakeRunner:
        def __init__(self, handler: Any, **kw: Any) -> None:
            made.update(kw)

        def install_signal_handlers(self) -> None:
            pass

        def run(self) -> None:
            pass

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("outbox.consumer.ConsumerRunner", FakeRunner)
        mp.setattr("outbox.cli._preflight", lambda *a, **kw: None)
        result = CliRunner().invoke(main, ["consume", "tests.unit.test_consumer:on_order",
                                           "--db", DB, "--kafka", "k:1",
                                           "--handler-timeout", "0", "--idle-tx-timeout", "0"])
    assert result.exit_code == 0, result.output
    assert made["handler_timeout"] is None and made["idle_tx_timeout"] is None


def test_a_bad_kafka_option_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["consume", "tests.unit.test_consumer:on_order",
                                       "--db", DB, "--kafka", "k:1", "--kafka-option", "oops"])
    assert result.exit_code == 2 and "oops" in result.output and "key=value" in result.output


@pytest.mark.parametrize(("settings", "message"), [
    ({"client": "rdkafka"}, "unknown Kafka client 'rdkafka'"),
    ({"max_poll_records": 0}, "max_poll_records must be >= 1"),
    ({"handler_timeout": -1}, "handler_timeout must be > 0"),
    ({"group_instance_id": ""}, "group_instance_id must be a non-empty name"),
    ({"kafka_config": {"enable.auto.commit": "true"}}, "enable_auto_commit"),
    ({"table_prefix": "bad prefix"}, "invalid table prefix"),
])
def test_settings_that_cannot_work_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ConsumerRunner(Projector(), db_url=DB, kafka="k:1", **settings)


def test_an_unknown_setting_is_named() -> None:
    with pytest.raises(TypeError, match=r"unknown consumer setting\(s\) \['max_pol_records'\]"):
        ConsumerRunner(Projector(), db_url=DB, kafka="k:1", max_pol_records=3)


def test_a_config_object_and_keywords_combine() -> None:
    config = ConsumerConfig(kafka="k:1", db_url=DB, max_poll_records=7)
    runner = ConsumerRunner(Projector(), config, group_id="other")
    try:
        assert runner.config.max_poll_records == 7 and runner.group_id == "other"
        assert config.group_id is None  # the caller's object is not changed
    finally:
        runner.close()


@pytest.mark.parametrize("command", ["relay", "consume"])
def test_client_confluent_without_the_extra_says_how_to_get_it(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # import raises ImportError
    args = [command, *(["tests.unit.test_consumer:on_order"] if command == "consume" else []),
            "--db", DB, "--kafka", "k:1", "--client", "confluent"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "pip install 'transactional-outbox[confluent]'" in result.output
