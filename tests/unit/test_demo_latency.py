"""The demo's latency histogram, drawn from synthetic latencies."""

from __future__ import annotations

import random
import struct
import sys
from pathlib import Path

import pytest

from examples.latency_plot import draw, draw_or_say, percentile


def latencies(n: int = 2000) -> list[float]:
    rng = random.Random(3)
    # most orders in tens of ms, a tail from the killed relay and consumer
    return sorted([rng.lognormvariate(3.5, 0.4) for _ in range(n)]
                  + [rng.uniform(2000, 9000) for _ in range(n // 50)])


def test_percentile_is_the_demos() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (
        51.0, 100.0, 100.0)


def test_draws_a_png_histogram(tmp_path: Path) -> None:
    lat = latencies()
    out = draw(lat, tmp_path / "demo-latency.png", to_kafka_ms=[v / 3 for v in lat])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (900, 500)
    assert len(data) > 15_000


def test_the_summary_gets_the_path_or_the_reason(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "reports" / "demo-latency.png"
    assert draw_or_say(latencies(), path) == str(path) and path.exists()
    assert draw_or_say([], tmp_path / "none.png") == "not drawn: no order was projected"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert draw_or_say(latencies(), tmp_path / "x.png") == (
        "not drawn: matplotlib is missing (pip install 'transactional-outbox[plots]')")
    assert not (tmp_path / "x.png").exists()
