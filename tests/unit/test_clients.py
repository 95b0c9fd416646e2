"""Choosing the Kafka client and passing its settings through, without a broker."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from outbox.cli import main
from outbox.confluent import ConfluentPublisher, DeliveryFailed, classify, producer_config
from outbox.errors import ConfigError
from outbox.publisher import (
    KafkaPublisher,
    KafkaSettings,
    TopicUnavailable,
    breaks_producer,
    is_permanent,
    make_publisher,
    parse_options,
)


def test_options_keep_each_clients_spelling() -> None:
    assert parse_options(["security.protocol=SASL_SSL", "linger.ms=7"], "confluent") == {
        "security.protocol": "SASL_SSL", "linger.ms": "7"}
    assert parse_options(["security.protocol=SSL", "retries=3", "ssl_check_hostname=false"],
                         "kafka-python") == {"security_protocol": "SSL", "retries": 3,
                                             "ssl_check_hostname": False}
    with pytest.raises(ValueError, match="not key=value"):
        parse_options(["oops"], "confluent")


@pytest.mark.parametrize("bad", [{"enable.idempotence": "false"}, {"acks": "1"}])
def test_confluent_settings_cannot_turn_the_guarantees_off(bad: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        producer_config(KafkaSettings("localhost:9092", extra=bad))
    config = producer_config(KafkaSettings("localhost:9092", extra={"linger.ms": "9"}))
    assert config["enable.idempotence"] is True and config["acks"] == "all"
    assert config["linger.ms"] == "9"


@pytest.mark.parametrize("bad", [{"enable_idempotence": False}, {"acks": 1}])
def test_kafka_python_settings_cannot_turn_the_guarantees_off(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        KafkaPublisher(KafkaSettings("localhost:1", extra=bad))


def test_unknown_client_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown Kafka client"):
        make_publisher("rdkafka", KafkaSettings("localhost:9092"))


def test_confluent_publisher_is_made_without_a_broker() -> None:
    # librdkafka connects lazily: making the producer needs no broker.
    publisher = make_publisher("confluent", KafkaSettings("127.0.0.1:1"))
    assert isinstance(publisher, ConfluentPublisher)
    publisher.close(timeout=0)


def test_librdkafka_errors_map_onto_the_outbox_classes() -> None:
    from confluent_kafka import KafkaError

    too_large = classify(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    assert isinstance(too_large, DeliveryFailed) and is_permanent(too_large)
    assert not breaks_producer(too_large)  # not fatal: the producer lives on
    timed_out = classify(KafkaError(KafkaError._MSG_TIMED_OUT))
    assert not is_permanent(timed_out)
    fatal = classify(KafkaError(KafkaError._FATAL, fatal=True))
    assert breaks_producer(fatal)
    no_topic = classify(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
    assert isinstance(no_topic, TopicUnavailable) and not breaks_producer(no_topic)


def test_relay_flags_are_checked_before_anything_runs() -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["relay", "--db", "postgresql://u:p@127.0.0.1:1/d", "--kafka",
                               "k:1", "--kafka-option", "novalue"])
    assert out.exit_code == 2 and "not key=value" in out.output
    out = runner.invoke(main, ["relay", "--db", "postgresql://u:p@127.0.0.1:1/d", "--kafka",
                               "k:1", "--client", "rdkafka"])
    assert out.exit_code == 2 and "rdkafka" in out.output


def test_librdkafka_never_times_a_message_out_and_refuses_to_be_told_to() -> None:
    """A message librdkafka times out can leave a gap (a later one of its partition gets
    through): the relay bounds the wait itself, so the producer's own timeout is off and
    cannot be turned back on."""
    from outbox.confluent import producer_config

    config = producer_config(KafkaSettings("k:1", delivery_timeout_ms=4000))
    assert config["message.timeout.ms"] == 0 and "delivery.timeout.ms" not in config
    for key in ("message.timeout.ms", "delivery.timeout.ms"):
        with pytest.raises(ConfigError, match=key):
            producer_config(KafkaSettings("k:1", extra={key: "5000"}))


class _FencedDuringFlush:
    """confluent-kafka 2.16.1 when fenced during flush(): a KafkaException is set, then
    a delivery report's callback runs and its first C call raises SystemError."""

    def flush(self, timeout: float) -> int:
        from confluent_kafka import KafkaError, KafkaException

        try:
            raise KafkaException(KafkaError(KafkaError._FENCED, "fenced", fatal=True))
        except KafkaException as exc:
            raise SystemError("<method 'code'> returned a result with an exception set") \
                from exc

    def commit_transaction(self, timeout: float) -> None:
        raise SystemError("not Kafka's answer")


def test_a_confluent_txn_producer_fenced_during_flush_says_fenced() -> None:
    """Not a SystemError crashing the relay (seen in the 600 s exactly-once chaos run)."""
    from outbox.confluent import ConfluentTxnProducer
    from outbox.txn import Fenced

    producer = ConfluentTxnProducer.__new__(ConfluentTxnProducer)
    producer._producer = _FencedDuringFlush()
    with pytest.raises(Fenced, match="_FENCED"):
        producer.flush(1.0)
    with pytest.raises(SystemError, match="not Kafka's answer"):  # a bug stays a bug
        producer.commit(1.0)
