"""Consumer groups as Kafka sees them, for `outbox status` (status.GroupOffsets on
kafka-python): committed offsets from an admin client, end offsets, topic sizes and the
records at given offsets from a consumer that belongs to no group (it commits nothing
and joins no group, so reading never disturbs the groups it reports on).

Every Kafka failure comes out as status.OffsetsUnavailable with kafka-python's reason.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from outbox.backoff import first_line
from outbox.consumer.source import TopicPartition
from outbox.status import OffsetsUnavailable

T = TypeVar("T")

#: The header the outbox's events carry their id in (the consumer's default id_header).
ID_HEADER = "ce_id"


class KafkaGroupOffsets:
    """status.GroupOffsets on kafka-python; clients open on first use, once."""

    def __init__(self, bootstrap: str, timeout: float = 5.0, id_header: str = ID_HEADER,
                 config: Mapping[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self.timeout = timeout
        self.id_header = id_header
        self.config = dict(config or {})
        self._admin: Any = None
        self._consumer: Any = None

    def _ms(self) -> int:
        return int(self.timeout * 1000)

    def _clients(self) -> tuple[Any, Any]:
        if self._admin is None:
            from kafka import KafkaConsumer
            from kafka.admin import KafkaAdminClient

            common = {"bootstrap_servers": self.bootstrap.split(","),
                      "client_id": "outbox-status", "request_timeout_ms": self._ms(),
                      "bootstrap_timeout_ms": self._ms(), **self.config}
            try:
                admin = KafkaAdminClient(**common)
            except ValueError as exc:  # kafka-python's parse of HOST:PORT
                raise OffsetsUnavailable(
                    f"bad bootstrap servers {self.bootstrap!r}: {exc}") from None
            try:
                self._consumer = KafkaConsumer(group_id=None, enable_auto_commit=False,
                                               allow_auto_create_topics=False, **common)
            except BaseException:
                admin.close()
                raise
            self._admin = admin
        return self._admin, self._consumer

    def _kafka(self, call: Callable[[], T]) -> T:
        """Run `call`, turning what Kafka did not answer into OffsetsUnavailable."""
        from kafka.errors import KafkaError

        try:
            return call()
        except (KafkaError, OSError) as exc:
            raise OffsetsUnavailable(first_line(exc)) from exc

    def committed(self, group: str) -> dict[TopicPartition, int]:
        def read() -> dict[TopicPartition, int]:
            admin, _ = self._clients()
            got = admin.list_group_offsets({group: None}).get(group, {})
            # a partition without a commit has offset -1
            return {TopicPartition(tp.topic, tp.partition): om.offset
                    for tp, om in got.items() if om.offset >= 0}

        return self._kafka(read)

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        def read() -> dict[TopicPartition, int]:
            _, consumer = self._clients()
            ends = consumer.end_offsets(_kafka_tps(tps), timeout_ms=self._ms())
            return {TopicPartition(tp.topic, tp.partition): n for tp, n in ends.items()}

        return self._kafka(read)

    def record_counts(self, topics: list[str]) -> dict[str, int]:
        """Records each existing topic holds (a missing topic is left out, not made)."""
        from kafka.structs import TopicPartition as KafkaTP

        def read() -> dict[str, int]:
            _, consumer = self._clients()
            out = {}
            for topic in topics:
                tps = [KafkaTP(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
                if not tps:
                    continue
                begins = consumer.beginning_offsets(tps, timeout_ms=self._ms())
                ends = consumer.end_offsets(tps, timeout_ms=self._ms())
                out[topic] = sum(ends[tp] - begins[tp] for tp in tps)
            return out

        return self._kafka(read)

    def event_ids_at(self, offsets: Mapping[TopicPartition, int]
                     ) -> dict[TopicPartition, str]:
        """The id header of the record at each offset; a partition whose record did not
        come within the timeout (or has no id) is left out."""
        def read() -> dict[TopicPartition, str]:
            _, consumer = self._clients()
            wanted = {tp: o for tp, o in offsets.items()}
            consumer.assign(_kafka_tps(list(wanted)))
            for tp, o in wanted.items():
                consumer.seek(_kafka_tps([tp])[0], o)
            found: dict[TopicPartition, str] = {}
            deadline = time.monotonic() + self.timeout
            try:
                while len(found) < len(wanted) and time.monotonic() < deadline:
                    got = consumer.poll(timeout_ms=200)
                    for ktp, records in got.items():
                        tp = TopicPartition(ktp.topic, ktp.partition)
                        for r in records:
                            if r.offset == wanted.get(tp) and tp not in found:
                                value = dict(r.headers or ()).get(self.id_header)
                                if value:
                                    found[tp] = value.decode(errors="replace")
                        if tp in wanted and tp not in found and records:
                            # a record past the offset: the one there is gone (compacted)
                            found.setdefault(tp, "")
            finally:
                consumer.assign([])
            return {tp: i for tp, i in found.items() if i}

        return self._kafka(read)

    def close(self) -> None:
        admin, consumer, self._admin, self._consumer = self._admin, self._consumer, None, None
        for client in (consumer, admin):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()


def _kafka_tps(tps: list[TopicPartition]) -> list[Any]:
    from kafka.structs import TopicPartition as KafkaTP

    return [KafkaTP(tp.topic, tp.partition) for tp in tps]
