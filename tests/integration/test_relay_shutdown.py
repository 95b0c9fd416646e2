"""SIGTERM while Kafka does not answer: the relay exits within its grace, cleanly, and
leaves the unacknowledged events in the outbox for the next relay."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.procs import RelayProcess, Writer, pending_count

GRACE = 10.0  # RelayConfig.shutdown_grace, the documented default


def test_sigterm_with_kafka_blackholed_exits_within_the_grace(
    db_url: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    from tests.chaos.proxy import TcpProxy
    from tests.chaos.run import KAFKA_PROXIED_PORT, KAFKA_PROXY_PORT

    topic = new_topic()
    proxy = TcpProxy(KAFKA_PROXY_PORT, KAFKA_PROXIED_PORT, "kafka")
    relay = RelayProcess(db_url, f"127.0.0.1:{KAFKA_PROXY_PORT}", tmp_path, "relay")
    try:
        Writer(db_url, topic, total=50, keys=5, rate=200).start().join()
        deadline = time.monotonic() + 30
        while pending_count(db_url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pending_count(db_url) == 0, "the relay should publish while Kafka answers"
        proxy.blackhole(120)
        Writer(db_url, topic, total=50, keys=5, rate=200).start().join()
        time.sleep(3)  # claimed and sent into the void
        assert relay.proc is not None
        started = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        code = relay.proc.wait(60)
        took = time.monotonic() - started
    finally:
        proxy.close()
        if relay.alive():
            relay.kill()
    output = relay.output()
    assert code == 0, output[-2000:]
    assert took <= GRACE + 3, f"SIGTERM took {took:.1f}s, over the {GRACE:.0f}s grace"
    assert "Traceback" not in output, output[-3000:]
    assert 0 < pending_count(db_url) <= 50  # the unacknowledged ones stay in the outbox
