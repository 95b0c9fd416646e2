"""The progress log of the exactly-once relay: which events each shard's last committed
Kafka transaction carried.

Every transaction of a shard also writes one record to the progress topic
(`outbox-<namespace>-progress`, compacted, one partition per shard): the positions of the
outbox rows it carries. It commits or aborts with the events. A relay that takes a shard
first initializes the shard's transactional id (fencing the previous owner, aborting
what it left open), then reads the shard's last committed record: those rows are in
Kafka already, so it deletes them instead of sending them again.

Each row is named by its position and its event id: a table made again (a restored
backup, a dropped development database) draws the same positions again, and a progress
record of the old one must not delete the new one's rows.

Why exact positions and not a watermark: positions are drawn before the writer
commits, so a transaction that commits late can insert a lower position after higher
ones were sent; a "done up to P" watermark would skip it. The last record is enough
because a relay never begins a shard's next transaction before it has deleted the rows
of the previous one (outbox.exactly_once).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from outbox.errors import ConfigError
from outbox.publisher import Delivery, KafkaSettings
from outbox.txn import InMemoryTxnBroker, OpenTransaction, TxnFailed, TxnProducer

log = logging.getLogger("outbox.relay")


def progress_topic(namespace: str) -> str:
    """The progress topic of the outbox named `namespace` (exactly_once.namespace)."""
    return f"outbox-{namespace}-progress"


Done = list[tuple[int, str]]  # (position, event id) of each row a transaction carried


def encode(shard: int, done: Done, relay_id: str) -> bytes:
    return json.dumps({"shard": shard, "positions": [p for p, _ in done],
                       "ids": [i for _, i in done], "relay": relay_id},
                      separators=(",", ":")).encode()


def decode(value: bytes) -> Done:
    data = json.loads(value)
    return list(zip((int(p) for p in data["positions"]), data["ids"], strict=True))


class ProgressLog(Protocol):
    topic: str

    def record(self, producer: TxnProducer, shard: int, done: Done,
               relay_id: str) -> Delivery:
        """Send the shard's progress record inside the producer's open transaction."""

    def last(self, shard: int, keepalive: Callable[[], object] = lambda: None) -> Done:
        """The rows the shard's last committed transaction carried ([] if none);
        `keepalive` is called about every half second while it waits."""

    def prepare(self, num_shards: int) -> None:
        """Before the first transaction: the topic exists, with a partition per shard."""

    def close(self) -> None: ...


class KafkaProgressLog:
    """The progress topic on Kafka, read with a `read_committed` kafka-python consumer."""

    def __init__(self, settings: KafkaSettings, topic: str, timeout: float = 30.0,
                 open_wait: float = 2.0) -> None:
        self.settings = settings
        self.topic = topic
        self.num_shards = 0
        self.timeout = timeout
        self.open_wait = open_wait  # how long a takeover waits for an open transaction
        self._consumers: dict[bool, Any] = {}  # read_committed or not: a consumer

    def prepare(self, num_shards: int) -> None:
        """Create the compacted topic with one partition per shard, or check the one
        there has enough partitions."""
        self.num_shards = num_shards
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_servers=self.settings.bootstrap_servers.split(","),
                                 client_id=f"{self.settings.client_id}-admin",
                                 **_security(self.settings.extra))
        try:
            brokers = len(admin.describe_cluster().get("brokers", [])) or 1
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(
                    self.topic, num_partitions=self.num_shards,
                    replication_factor=min(3, brokers),
                    topic_configs={"cleanup.policy": "compact", "segment.ms": "600000",
                                   "min.insync.replicas": str(min(2, brokers))})])
            partitions = self._partitions(admin)
        finally:
            admin.close()
        if partitions < self.num_shards:
            raise ConfigError(f"the progress topic {self.topic} has {partitions} partitions "
                              f"but the outbox has {self.num_shards} shards: add partitions "
                              "(kafka-topics --alter --partitions) or delete the topic")

    def _partitions(self, admin: Any) -> int:
        deadline = time.monotonic() + self.timeout
        while True:
            described = admin.describe_topics([self.topic])
            parts = described[0].get("partitions") if described else None
            if parts:
                return len(parts)
            if time.monotonic() > deadline:
                raise TxnFailed(f"no metadata for the progress topic {self.topic}")
            time.sleep(0.2)

    def record(self, producer: TxnProducer, shard: int, done: Done,
               relay_id: str) -> Delivery:
        return producer.send(self.topic, f"shard-{shard}".encode(),
                             encode(shard, done, relay_id), [], partition=shard)

    def last(self, shard: int, keepalive: Callable[[], object] = lambda: None) -> Done:
        from kafka import TopicPartition

        consumer = self._open()
        tp = TopicPartition(self.topic, shard)
        consumer.assign([tp])
        end = self._stable_end(tp, keepalive, time.monotonic() + self.open_wait)
        deadline = time.monotonic() + self.timeout
        window = 16
        while True:
            start = max(0, end - window)
            consumer.seek(tp, start)
            found: bytes | None = None
            while consumer.position(tp) < end:
                if time.monotonic() > deadline:
                    raise TxnFailed(f"reading {self.topic}[{shard}] took over "
                                    f"{self.timeout:.0f}s")
                keepalive()
                for record in consumer.poll(timeout_ms=500).get(tp, []):
                    if record.offset < end and record.value is not None:
                        found = record.value
            if found is not None:
                return decode(found)
            if start == 0:
                return []
            window *= 8  # aborted records and transaction markers in the window

    def _stable_end(self, tp: Any, keepalive: Callable[[], object], deadline: float) -> int:
        """The partition's last stable offset, once no transaction is open on it.

        Called right after the shard's transactional id was initialized, which ends
        whatever transaction that id had open (the coordinator answers once its markers
        are written), so nothing should be. An open one anyway belongs to no producer
        the coordinator knows of (a "hanging" transaction, or another id writing here):
        reading up to its first offset would miss its record, and if it is ever
        committed (a later commit marker of the same producer id can do that) its
        events would be sent twice. So wait a moment for it to end, then raise
        OpenTransaction: the relay leaves that shard alone for a while (outbox.
        exactly_once) and goes on with the others."""
        stable, high = self._ends(tp)
        if stable >= high:
            return stable
        log.debug("%s[%d]: a transaction is open from offset %d to %d right after the "
                  "shard's transactional id was initialized; waiting for it to end",
                  self.topic, tp.partition, stable, high)
        while time.monotonic() < deadline:
            keepalive()
            time.sleep(0.5)
            stable, high = self._ends(tp)
            if stable >= high:
                return stable
        raise OpenTransaction(
            f"{self.topic}[{tp.partition}] has a transaction open from offset {stable} that "
            "no producer of this shard owns (a hanging transaction, or another "
            "transactional id writing there); it also holds back read_committed consumers. "
            "Find and abort it with kafka-transactions.sh find-hanging / abort")

    def _ends(self, tp: Any) -> tuple[int, int]:
        """(last stable offset, high watermark): equal when no transaction is open."""
        stable = self._open().end_offsets([tp])[tp]
        high = self._open(committed=False).end_offsets([tp])[tp]
        return int(stable), int(high)

    def _open(self, committed: bool = True) -> Any:
        consumer = self._consumers.get(committed)
        if consumer is None:
            from kafka import KafkaConsumer

            consumer = self._consumers[committed] = KafkaConsumer(
                bootstrap_servers=self.settings.bootstrap_servers.split(","),
                client_id=f"{self.settings.client_id}-progress", group_id=None,
                enable_auto_commit=False,
                isolation_level="read_committed" if committed else "read_uncommitted",
                **_security(self.settings.extra))
        return consumer

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers.clear()


def _security(extra: dict[str, Any]) -> dict[str, Any]:
    """The connection settings (TLS, SASL) of the producer's options, for the admin
    client and the progress consumer."""
    return {k: v for k, v in extra.items()
            if k.startswith(("security_", "ssl_", "sasl_")) or k == "api_version"}


class InMemoryProgressLog:
    """The progress log on an InMemoryTxnBroker (unit tests)."""

    def __init__(self, broker: InMemoryTxnBroker, topic: str = "outbox-progress") -> None:
        self.broker = broker
        self.topic = topic

    def record(self, producer: TxnProducer, shard: int, done: Done,
               relay_id: str) -> Delivery:
        return producer.send(self.topic, f"shard-{shard}".encode(),
                             encode(shard, done, relay_id), [], partition=shard)

    def last(self, shard: int, keepalive: Callable[[], object] = lambda: None) -> Done:
        with self.broker._lock:
            mine = [r for r in self.broker.committed
                    if r.topic == self.topic and r.partition == shard]
        return decode(mine[-1].value) if mine else []

    def prepare(self, num_shards: int) -> None:
        return None

    def close(self) -> None:
        return None
