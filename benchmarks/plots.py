"""The pictures of `make bench` (matplotlib, the `plots` extra):

- throughput.png: every rate beside the ceiling it is compared to, with the ratio and
  the issue's target, one panel per benchmark;
- latency.png: the commit-to-ack latency CDF of each client at each rate;
- e2e.png: the commit-to-effect latency CDF of each client and handler style.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Result

VALUE, CEILING, MISSED = "#1f77b4", "#c7c7c7", "#d62728"


def throughput(results: list[Result], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[Result]] = {}
    for r in results:
        if r.unit.endswith("/s"):
            groups.setdefault(r.panel or r.group, []).append(r)
    if not groups:
        return None
    heights = [1.0 + 0.55 * len(rs) for rs in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, sum(heights) + 0.8),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (group, rs) in zip(axes[:, 0], groups.items(), strict=True):
        rows = list(reversed(rs))  # first result on top
        ys = range(len(rows))
        top = max(max(r.value, r.ceiling or 0) for r in rows)
        for y, r in zip(ys, rows, strict=True):
            if r.ceiling:
                ax.barh(y + 0.2, r.ceiling, height=0.38, color=CEILING)
                ax.text(r.ceiling, y + 0.2, f"  {r.ceiling:,.0f} {r.ceiling_name}",
                        va="center", fontsize=7, color="#555555")
                colour = MISSED if r.met is False else VALUE
                ax.barh(y - 0.2, r.value, height=0.38, color=colour)
                target = (f"  (target {r.target[0]} {r.target[1]:.2f})"
                          if r.target else "")
                ax.text(r.value, y - 0.2, f"  {r.value:,.0f}: {r.ratio:.2f}x{target}",
                        va="center", fontsize=8, fontweight="bold", color=colour)
            else:  # a ceiling on its own (raw clients)
                ax.barh(y, r.value, height=0.5, color=CEILING, hatch="//",
                        edgecolor="#888888")
                ax.text(r.value, y, f"  {r.value:,.0f}", va="center", fontsize=8)
        ax.set_yticks(list(ys), [r.name for r in rows], fontsize=8)
        ax.set_xlim(0, top * 1.6)  # room for the labels
        units = ", ".join(dict.fromkeys(r.unit for r in rs))
        ax.set_title(f"{group}: {units} (grey: the ceiling, measured in the same run)",
                     fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_formatter(
            matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency(results: list[Result], path: Path) -> Path | None:
    """Commit to Kafka's ack: each client at each rate (dashed: 5,000/s)."""
    return _cdf(results, path, "commit-to-ack",
                lambda label: "-" if ", 1,000/s" in label else "--",
                [(10, "10 ms: the p99 target\n(confluent, 1,000/s)")],
                "Commit-to-ack latency: one relay woken by NOTIFY, writers in the same "
                "process")


def effect(results: list[Result], path: Path) -> Path | None:
    """Commit to the consumer's effect (dashed: one statement per event)."""
    return _cdf(results, path, "commit-to-effect",
                lambda label: "--" if "execute" in label else "-",
                [(20, "20 ms: the p50 target"), (100, "100 ms: the p99 target")],
                "Commit to effect at 1,000/s: outbox relay and outbox consume processes, "
                "writers in a third")


def _cdf(results: list[Result], path: Path, prefix: str, style: Callable[[str], str],
         targets: list[tuple[float, str]], title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = [r for r in results if r.samples and r.name.startswith(prefix)]
    if not series:
        return None
    colours = {"kafka-python": "#ff7f0e", "confluent": "#1f77b4"}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in series:
        samples = np.sort(np.asarray(r.samples))
        label = r.name.removesuffix(", p50").removeprefix(f"{prefix}, ")
        client = label.split(",")[0]
        p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
        reached = re.search(r"reached ([\d,]+/s)", r.note)
        if reached:
            label += f" (reached {reached.group(1)})"
        ax.plot(samples, np.arange(1, len(samples) + 1) / len(samples),
                color=colours.get(client, "#2ca02c"), linestyle=style(label),
                label=f"{label}: p50 {np.median(samples):.1f} ms, p99 {p99:.1f} ms")
    for at, text in targets:
        ax.axvline(at, color="#d62728", linewidth=0.8, linestyle=":")
        ax.text(at, 0.55, f" {text}".replace("\n", "\n "), fontsize=7, color="#d62728")
    ax.axhline(0.99, color="#888888", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.text(ax.get_xlim()[0], 0.985, " p99", fontsize=7, color="#888888", va="top")
    ax.set_xlabel(f"{prefix} latency (ms, log scale)")
    ax.set_ylabel("fraction of events")
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right", framealpha=0.95)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: list[Result], out: Path) -> list[Path]:
    """The plots into `out`; an empty list (and a hint) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no plots: matplotlib is missing (pip install 'transactional-outbox[plots]')")
        return []
    made = [throughput(results, out / "throughput.png"), latency(results, out / "latency.png"),
            effect(results, out / "e2e.png")]
    return [p for p in made if p is not None]
