"""The demo's commit-to-projection latency histogram (matplotlib: the `plots` extra).

`make demo` saves it to reports/demo-latency.png and names it in its summary.
"""

from __future__ import annotations

from pathlib import Path


def percentile(sorted_ms: list[float], p: float) -> float:
    """The demo's percentile: the value at index p * n of the sorted latencies."""
    return sorted_ms[min(len(sorted_ms) - 1, int(p * len(sorted_ms)))]


def draw(latencies_ms: list[float], path: Path, to_kafka_ms: list[float] | None = None,
         title: str = "Commit-to-projection latency") -> Path:
    """A histogram of `latencies_ms` on log-spaced bins (a kill's tail is 100x the
    median), p50 and p99 marked; `to_kafka_ms`, the relay's share, as an outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not latencies_ms:
        raise ValueError("no latencies to draw")
    values = np.sort(np.asarray(latencies_ms, dtype=float))
    every = [*latencies_ms, *(to_kafka_ms or [])]
    low = max(0.1, min(every))  # (a clock step can make one negative: clipped to low)
    high = max(low * 2, max(every))
    bins = [float(b) for b in np.geomspace(low, high, 50)]
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.hist(np.clip(values, low, None), bins=bins, color="#1f77b4", alpha=0.75, log=True,
            label=f"commit to read model ({len(values):,} orders)")
    if to_kafka_ms:
        ax.hist(np.clip(to_kafka_ms, low, None), bins=bins, histtype="step", color="#ff7f0e",
                linewidth=1.2, log=True, label="of which commit to Kafka (relay)")
    ordered = [float(v) for v in values]
    for p, style in ((0.5, "--"), (0.99, ":")):
        at = percentile(ordered, p)
        ax.axvline(at, color="#d62728", linestyle=style, linewidth=1)
        ax.text(at, 0.97, f" p{int(p * 100)} {at:.0f} ms", transform=ax.get_xaxis_transform(),
                color="#d62728", fontsize=8, va="top")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("orders (log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1, 0.9))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_or_say(latencies_ms: list[float], path: Path,
                to_kafka_ms: list[float] | None = None) -> str:
    """Draw, and return what the summary shows: the path, or why there is no picture."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "not drawn: matplotlib is missing (pip install 'transactional-outbox[plots]')"
    if not latencies_ms:
        return "not drawn: no order was projected"
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(draw(latencies_ms, path, to_kafka_ms))
