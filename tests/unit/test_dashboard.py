"""dashboards/outbox.json queries only what outbox/metrics.py registers, and shows all of it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from outbox.metrics import ConsumerMetrics, RelayMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "outbox.json"
METRIC = re.compile(r"\b(outbox_[a-z0-9_]+)")


def registered() -> tuple[set[str], set[str]]:
    """(sample names, family names) of both metric classes on a fresh registry: the
    names Prometheus stores, with the _total, _bucket, _count, _sum suffixes."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    relay, consumer = RelayMetrics(registry), ConsumerMetrics(registry)
    # a labelled family shows samples only once a child exists
    consumer.batch(0.1, 1, 0, ["handler-failed"])
    consumer.lag({("orders", 0): 3})
    relay.batch(0.1, 1)
    families = list(registry.collect())
    return {s.name for f in families for s in f.samples}, {f.name for f in families}


def queries(node: Any) -> Iterator[str]:
    """Every PromQL string in the dashboard: panel targets and template variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            # ("query" is also a datasource variable's plugin name: not PromQL)
            promql = key in ("expr", "definition", "query") and value != "prometheus"
            if promql and isinstance(value, str):
                yield value
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def test_every_queried_metric_is_registered(dashboard: dict[str, Any]) -> None:
    samples, _ = registered()
    used = {m for q in queries(dashboard) for m in METRIC.findall(q)}
    assert len(used) >= 12, f"the walk found the dashboard's queries: {sorted(used)}"
    assert used - samples == set(), "queried but not registered by outbox/metrics.py"


def test_every_registered_metric_has_a_panel(dashboard: dict[str, Any]) -> None:
    _, families = registered()
    used = {m for q in queries(dashboard) for m in METRIC.findall(q)}
    suffixes = ("", "_total", "_bucket", "_count", "_sum")
    assert {f for f in families if not any(f + s in used for s in suffixes)} == set()


def test_quantiles_are_taken_over_buckets_by_le(dashboard: dict[str, Any]) -> None:
    quantiles = [q for q in queries(dashboard) if "histogram_quantile" in q]
    assert len(quantiles) >= 2
    for q in quantiles:
        assert re.search(r"_bucket\b", q) and re.search(r"by \([^)]*\ble\b", q), q


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    names = {v["name"] for v in dashboard["templating"]["list"]}
    for p in panels:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + \
            p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval"} <= names
    titles = [p["title"] for p in panels]
    for wanted in ("Publish rate", "Send failures", "Dead-lettered by the relay",
                   "Batch latency (claim to ack)", "Owned shards", "Idle", "Processed",
                   "Duplicates skipped", "Handler failures", "Dead-lettered by the consumer",
                   "Consumer lag"):
        assert wanted in titles
