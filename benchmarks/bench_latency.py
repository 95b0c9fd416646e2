"""Commit-to-ack latency at a steady 200 events/s: one relay woken by NOTIFY, in the same
process as the writer; the ack time is taken in the producer's delivery callback."""

from __future__ import annotations

import threading
import time
import uuid

import sqlalchemy as sa
from kafka.admin import KafkaAdminClient, NewTopic
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.common import Result, drop_database, fresh_database
from outbox import Outbox
from outbox.event import KafkaHeaders
from outbox.publisher import Delivery, KafkaPublisher, KafkaSettings
from outbox.relay import Relay, RelayConfig

RATE = 200
SECONDS = 15


class TimedPublisher(KafkaPublisher):
    """Records when Kafka acknowledged each event id."""

    def __init__(self, settings: KafkaSettings) -> None:
        super().__init__(settings)
        self.acked: dict[str, float] = {}

    def send(self, topic: str, key: bytes, value: bytes, headers: KafkaHeaders) -> Delivery:
        eid = dict(headers)["ce_id"].decode()
        future = self._producer.send(topic, key=key, value=value, headers=headers)
        future.add_callback(lambda _meta: self.acked.__setitem__(eid, time.monotonic()))
        from outbox.publisher import _KafkaDelivery

        return _KafkaDelivery(future)


def _percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def run(db_url: str, kafka: str) -> list[Result]:
    url = fresh_database(db_url)
    topic = f"bench-latency-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    admin.close()
    publisher = TimedPublisher(KafkaSettings(kafka, linger_ms=0))
    relay = Relay(RelayConfig(db_url=url, poll_interval=1.0), lambda: publisher)
    thread = threading.Thread(target=relay.run)
    thread.start()
    engine = sa.create_engine(url)
    box = Outbox(notify="auto")
    factory = sessionmaker(engine)
    committed: dict[str, float] = {}

    @box.transactional(factory)
    def write(session: Session, i: int) -> str:
        return str(box.publish(session, topic=topic, key=f"k{i % 50}", type="Tick",
                               payload={"i": i}).id)

    try:
        time.sleep(3)  # let the relay take its shards and fall asleep
        started = time.monotonic()
        for i in range(RATE * SECONDS):
            target = started + i / RATE
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            eid = write(i)
            committed[eid] = time.monotonic()
        deadline = time.monotonic() + 30
        while len(publisher.acked) < len(committed) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        relay.stop()
        thread.join(30)
        engine.dispose()
        drop_database(db_url, url)
    latencies = [(publisher.acked[e] - t) * 1000 for e, t in committed.items()
                 if e in publisher.acked]
    missing = len(committed) - len(latencies)
    note = f"{len(latencies)} events" + (f", {missing} NOT ACKED" if missing else "")
    return [
        Result(f"latency: commit-to-ack p50 at {RATE}/s, NOTIFY", _percentile(latencies, 50),
               "ms", note=note),
        Result(f"latency: commit-to-ack p99 at {RATE}/s, NOTIFY", _percentile(latencies, 99),
               "ms", note=note),
    ]
