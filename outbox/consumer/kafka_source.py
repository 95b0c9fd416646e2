"""The kafka-python RecordSource (the default client).

Only kafka-python's public API is used. Its fetcher parks the records it had parsed for
a partition that gets paused, and on a quiet topic may never give them back after the
partition is resumed (kafka-python 3.0.x). So this source never pauses a partition
while kafka-python holds parsed records for it: every `KafkaConsumer.poll` takes *all*
buffered records (a very large `max_records`), which leaves kafka-python's in-line slot
empty, and the source hands them out `max_records` at a time from its own per-partition
buffer. A partition whose buffer grows past a limit is paused until the runner catches
up (flow control); a held partition is sought back and paused, and its buffer dropped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from outbox.backoff import first_line
from outbox.consumer.config import ConsumerConfig
from outbox.consumer.source import (
    Batch,
    CommitFailed,
    CommitRefused,
    RebalanceListener,
    Record,
    SourceUnavailable,
    TopicPartition,
)

log = logging.getLogger("outbox.consumer")

#: kafka-python's poll is asked for this many records: all it has buffered.
DRAIN = 2**31 - 1
#: How often kafka-python is polled while the source still has records to hand out
#: (rebalance callbacks and fetches run inside its poll).
CLIENT_POLL_INTERVAL = 1.0


class KafkaPythonSource:
    """A RecordSource on kafka-python's KafkaConsumer (`client`, once subscribed)."""

    def __init__(self, config: ConsumerConfig, group_id: str) -> None:
        self.config = config
        self.group_id = group_id
        self.client: Any = None
        self._buffers: dict[TopicPartition, deque[Record]] = {}
        self._held: set[TopicPartition] = set()  # paused by the runner
        self._flow: set[TopicPartition] = set()  # paused by this source (full buffer)
        self._revoked: list[TopicPartition] = []
        self._assigned: list[TopicPartition] = []
        self._lock = threading.Lock()
        self._last_client_poll = 0.0
        self._turn = 0
        self.flow_limit = max(2 * config.max_poll_records, 1000)

    # -- membership -------------------------------------------------------------------

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        import kafka
        from kafka.errors import KafkaError

        cfg = self.config
        settings: dict[str, Any] = {
            "bootstrap_servers": cfg.kafka.split(","),
            "client_id": cfg.name_client(),
            "max_poll_records": cfg.max_poll_records,
            "bootstrap_timeout_ms": 5000,  # Kafka down at start: retry (and obey stop()) soon
            **cfg.kafka_config,
            "group_id": self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": cfg.kafka_config.get("auto_offset_reset", "earliest"),
        }
        if cfg.session_timeout_ms is not None:
            settings["session_timeout_ms"] = cfg.session_timeout_ms
            settings.setdefault("heartbeat_interval_ms", max(500, cfg.session_timeout_ms // 4))
        if cfg.group_instance_id is not None:
            settings["group_instance_id"] = cfg.group_instance_id
        client = None
        try:
            client = kafka.KafkaConsumer(**settings)
            client.subscribe(topics=list(topics), listener=_listener(self, listener))
        except Exception as exc:
            if client is not None:  # not left to __del__ at interpreter exit
                with contextlib.suppress(Exception):
                    client.close(autocommit=False, timeout_ms=1000)
            if isinstance(exc, KafkaError):  # (the runner tells misconfiguration apart)
                raise SourceUnavailable(f"Kafka unavailable ({first_line(exc)})") from exc
            raise
        self.client = client

    def _note_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        with self._lock:
            self._revoked.extend(partitions)

    def _note_assigned(self, partitions: Sequence[TopicPartition]) -> None:
        with self._lock:
            self._assigned.extend(partitions)

    def _forget_revoked(self) -> None:
        with self._lock:
            revoked, self._revoked = self._revoked, []
        for tp in revoked:
            self._buffers.pop(tp, None)
            self._held.discard(tp)
            self._flow.discard(tp)

    def _restart_assigned(self) -> set[TopicPartition]:
        """Start each partition just assigned from its committed offset, unpaused.

        kafka-python keeps a partition's fetch position and pause flag when a rebalance
        gives it back to the same member, though the records this source had buffered
        (and dropped at the revocation) lie behind that position: without this, they
        would never be delivered again, and a partition paused before would stay paused.
        Starting from the commit is what the other sources do; what the runner had
        applied but not committed comes again and is skipped as a duplicate."""
        from kafka.structs import TopicPartition as KafkaTP

        with self._lock:
            assigned, self._assigned = self._assigned, []
        for tp in assigned:
            self._buffers.pop(tp, None)
            self._held.discard(tp)
            self._flow.discard(tp)
            ktp = KafkaTP(tp.topic, tp.partition)
            self._client_resume(tp)
            try:
                committed = self.client.committed(ktp, timeout_ms=5000)
                if committed is not None:
                    self.client.seek(ktp, committed)
                elif self.config.kafka_config.get("auto_offset_reset", "earliest") == "latest":
                    self.client.seek_to_end(ktp)
                else:
                    self.client.seek_to_beginning(ktp)
            except Exception as exc:  # revoked again meanwhile: the next assignment restarts
                log.debug("consumer %s: restart %s at its commit: %s", self.group_id, tp, exc)
        return set(assigned)

    # -- records ----------------------------------------------------------------------

    def poll(self, timeout: float, max_records: int) -> Batch:
        from kafka.errors import KafkaError

        self._forget_revoked()
        buffered = sum(len(b) for b in self._buffers.values())
        now = time.monotonic()
        if buffered < max_records or now - self._last_client_poll >= CLIENT_POLL_INTERVAL:
            wait = 0 if buffered else int(timeout * 1000)
            try:
                got = self.client.poll(timeout_ms=wait, max_records=DRAIN)
            except KafkaError as exc:
                raise SourceUnavailable(f"Kafka unavailable ({first_line(exc)})") from exc
            self._last_client_poll = time.monotonic()
            self._forget_revoked()
            restarted = self._restart_assigned()  # their records here predate the seek
            for ktp, records in got.items():
                tp = TopicPartition(ktp.topic, ktp.partition)
                if tp not in self._held and tp not in restarted:
                    self._buffers.setdefault(tp, deque()).extend(records)
            for tp, buffer in self._buffers.items():
                if len(buffer) >= self.flow_limit and tp not in self._flow:
                    self._flow.add(tp)
                    if tp not in self._held:
                        self._client_pause(tp)
        return self._hand_out(max_records)

    def _hand_out(self, max_records: int) -> Batch:
        """Up to `max_records` buffered records, taking partitions in turn."""
        out: dict[TopicPartition, list[Record]] = {}
        ready = [tp for tp, b in self._buffers.items() if b]
        if ready:
            self._turn = (self._turn + 1) % len(ready)
            ready = ready[self._turn:] + ready[:self._turn]
        left = max_records
        for tp in ready:
            buffer = self._buffers[tp]
            take = min(left, len(buffer))
            out[tp] = [buffer.popleft() for _ in range(take)]
            left -= take
            if not left:
                break
        for tp in list(self._flow):
            if len(self._buffers.get(tp, ())) < self.flow_limit // 2:
                self._flow.discard(tp)
                if tp not in self._held:
                    self._client_resume(tp)
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        from kafka.structs import TopicPartition as KafkaTP

        self._buffers.pop(tp, None)
        try:
            self.client.seek(KafkaTP(tp.topic, tp.partition), offset)
        except Exception as exc:  # no longer assigned: the next owner starts from the commit
            log.debug("consumer %s: seek %s to %d: %s", self.group_id, tp, offset, exc)

    def pause(self, tp: TopicPartition) -> None:
        self._held.add(tp)
        self._buffers.pop(tp, None)
        if tp not in self._flow:
            self._client_pause(tp)

    def resume(self, tp: TopicPartition) -> None:
        self._held.discard(tp)
        if tp not in self._flow:
            self._client_resume(tp)

    def _client_pause(self, tp: TopicPartition) -> None:
        from kafka.structs import TopicPartition as KafkaTP

        with contextlib.suppress(Exception):  # not assigned any more: nothing to pause
            self.client.pause(KafkaTP(tp.topic, tp.partition))

    def _client_resume(self, tp: TopicPartition) -> None:
        from kafka.structs import TopicPartition as KafkaTP

        with contextlib.suppress(Exception):
            self.client.resume(KafkaTP(tp.topic, tp.partition))

    # -- offsets ----------------------------------------------------------------------

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError
        from kafka.structs import OffsetAndMetadata
        from kafka.structs import TopicPartition as KafkaTP

        try:
            self.client.commit({KafkaTP(tp.topic, tp.partition): OffsetAndMetadata(o, "", -1)
                                for tp, o in offsets.items()},
                               timeout_ms=int(self.config.commit_timeout * 1000))
        except (CommitFailedError, RebalanceInProgressError) as exc:
            raise CommitRefused(first_line(exc)) from exc
        except KafkaError as exc:
            raise CommitFailed(first_line(exc)) from exc

    def assignment(self) -> set[TopicPartition]:
        if self.client is None:
            return set()
        return {TopicPartition(tp.topic, tp.partition) for tp in self.client.assignment()}

    def lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition: end offset minus the next offset the runner gets."""
        assigned = list(self.client.assignment() or ())
        if not assigned:
            return {}
        ends = self.client.end_offsets(assigned, timeout_ms=2000)
        lags: dict[TopicPartition, int] = {}
        for ktp in assigned:
            tp = TopicPartition(ktp.topic, ktp.partition)
            buffer = self._buffers.get(tp)
            position = buffer[0].offset if buffer else self.client.position(ktp, timeout_ms=1000)
            if position is not None and ktp in ends:
                lags[tp] = max(0, ends[ktp] - position)
        return lags

    def close(self) -> None:
        client, self.client = self.client, None
        self._buffers.clear()
        if client is not None:
            client.close(autocommit=False, timeout_ms=5000)


def _listener(source: KafkaPythonSource, listener: RebalanceListener) -> Any:
    """kafka-python's rebalance listener; it runs on the client's IO thread, so it only
    passes notes on."""
    from kafka import ConsumerRebalanceListener

    def ours(partitions: Any) -> list[TopicPartition]:
        return sorted(TopicPartition(tp.topic, tp.partition) for tp in partitions)

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        def on_partitions_revoked(self, revoked: Any) -> None:
            tps = ours(revoked)
            if tps:
                source._note_revoked(tps)
                listener.revoked(tps)

        def on_partitions_assigned(self, assigned: Any) -> None:
            tps = ours(assigned)
            source._note_assigned(tps)
            listener.assigned(tps)

    return Listener()

