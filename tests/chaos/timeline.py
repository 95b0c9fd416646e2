"""The chaos run's timeline picture: events written, published and applied per second,
the backlog, and every fault on the time axis (one lane per kind).

`make chaos` draws reports/chaos-seed<N>-timeline.png at the end of the run; redraw one
from a summary with

    python -m tests.chaos.timeline reports/chaos-seed1.json [--out PICTURE.png]

Rates come from the summary's `samples` (cumulative counts about every second,
tests/chaos/check.py:counts); summaries written before runs recorded samples have only
the faults, and the picture says so. matplotlib is the `plots` extra: without it the
run prints one line and goes on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RATES = (("written", "written (committed)", "#1f77b4"),
         ("published", "published (left the outbox)", "#ff7f0e"),
         ("applied", "applied by the consumer", "#2ca02c"))
#: Faults that take a whole server away: also shaded behind the rates.
OUTAGES = {"kafka_kill": ("#d62728", "Kafka broker down"),
           "pg_restart": ("#9467bd", "PostgreSQL restarting")}
#: Shortest bar drawn for a fault, in seconds (an instant cut stays visible).
MIN_BAR = 1.5


def png_for(summary_path: Path) -> Path:
    """reports/chaos-seed1.json -> reports/chaos-seed1-timeline.png"""
    return summary_path.with_name(f"{summary_path.stem}-timeline.png")


def per_second(samples: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """The rate of a cumulative count between successive samples, at the later one."""
    times, rates = [], []
    for a, b in itertools.pairwise(samples):
        dt = b["at"] - a["at"]
        if dt > 0:
            times.append(b["at"])
            rates.append(max(0.0, (b[key] - a[key]) / dt))
    return times, rates


def draw(summary: dict[str, Any], path: Path) -> Path:
    """Draw the timeline of a run's summary (run.Report.as_dict()) to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    samples = summary.get("samples") or []
    faults = summary.get("timeline") or []
    duration = float(summary.get("duration") or 0)
    kinds = [k for k in summary.get("faults", {}) if any(f["kind"] == k for f in faults)]
    kinds += sorted({f["kind"] for f in faults} - set(kinds))
    end = max([duration, *(s["at"] for s in samples),
               *(f["at"] + f["seconds"] for f in faults)], default=1.0)

    fig, (ax_rate, ax_back, ax_faults) = plt.subplots(
        3, 1, sharex=True, figsize=(14, 9.5),
        gridspec_kw={"height_ratios": [3, 1.6, max(2.0, 0.3 * len(kinds))]})
    title = (f"chaos run, seed {summary.get('seed')}: {duration:.0f} s of faults"
             + (", exactly-once" if summary.get("exactly_once") else "")
             + (f", UNSAFE without {summary['unsafe']}" if summary.get("unsafe") else "")
             + f"; {summary.get('events_committed', 0):,} events committed; violations: "
             + (", ".join(f"{k} {v}" for k, v in summary.get("violations", {}).items())
                or "none"))
    fig.suptitle(title, fontsize=11)

    for ax in (ax_rate, ax_back):
        for f in faults:
            if f["kind"] in OUTAGES and f.get("hit"):
                ax.axvspan(f["at"], f["at"] + max(f["seconds"], 0.5),
                           color=OUTAGES[f["kind"]][0], alpha=0.10, linewidth=0)
        if duration and end > duration:
            ax.axvspan(duration, end, color="#888888", alpha=0.12, linewidth=0)

    if samples:
        for key, label, colour in RATES:
            xs, ys = per_second(samples, key)
            ax_rate.plot(xs, ys, color=colour, linewidth=0.9, label=label)
        ax_back.fill_between([s["at"] for s in samples], [s["pending"] for s in samples],
                             step="post", color="#7f7f7f", alpha=0.6)
        ax_back.plot([s["at"] for s in samples], [s["pending"] for s in samples],
                     drawstyle="steps-post", color="#404040", linewidth=0.7)
    else:
        for ax in (ax_rate, ax_back):
            ax.text(0.5, 0.5, "no samples in this summary (runs before the timeline "
                    "sampler recorded faults only)", transform=ax.transAxes, ha="center",
                    va="center", fontsize=9, color="#555555")
    handles, _ = ax_rate.get_legend_handles_labels()
    handles += [Patch(color=c, alpha=0.25, label=label) for c, label in OUTAGES.values()]
    if duration and end > duration:
        handles.append(Patch(color="#888888", alpha=0.3, label="faults over: heal and drain"))
    ax_rate.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=8,
                   ncol=len(handles), frameon=False)
    ax_rate.set_ylabel("events per second")
    ax_rate.set_ylim(bottom=0)
    ax_rate.grid(alpha=0.3)
    ax_back.set_ylabel("backlog\n(events pending)")
    ax_back.set_ylim(bottom=0)
    ax_back.grid(alpha=0.3)

    # lane colours: tab20 without its reds and purples, which mark the outages
    palette = [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i not in (6, 7, 8, 9)]
    for lane, kind in enumerate(kinds):
        mine = [f for f in faults if f["kind"] == kind]
        hit = [(f["at"], max(f["seconds"], MIN_BAR)) for f in mine if f.get("hit")]
        missed = [(f["at"], max(f["seconds"], MIN_BAR)) for f in mine if not f.get("hit")]
        colour = OUTAGES[kind][0] if kind in OUTAGES else palette[lane % len(palette)]
        ax_faults.broken_barh(hit, (lane - 0.35, 0.7), facecolors=colour)
        if missed:
            ax_faults.broken_barh(missed, (lane - 0.35, 0.7), facecolors="none",
                                  edgecolors=colour, linewidth=0.8)
    ax_faults.set_yticks(range(len(kinds)),
                         [f"{k} ({sum(1 for f in faults if f['kind'] == k and f.get('hit'))})"
                          for k in kinds], fontsize=8)
    ax_faults.set_ylim(len(kinds) - 0.5, -0.5)
    ax_faults.set_ylabel("faults (hits)")
    ax_faults.grid(axis="x", alpha=0.3)
    if any(not f.get("hit") for f in faults):
        ax_faults.legend(handles=[Patch(facecolor="#999999", label="injected"),
                                  Patch(facecolor="none", edgecolor="#999999",
                                        label="tried, window missed")],
                         loc="upper right", fontsize=7, framealpha=0.9)
    ax_faults.set_xlabel("seconds since the run started")
    ax_faults.set_xlim(0, end)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_or_skip(summary: dict[str, Any], path: Path,
                 say: Callable[[str], None] = print) -> Path | None:
    """draw(), but never fail the run for the picture: one line says why there is none."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say("no timeline picture: matplotlib is missing "
            "(pip install 'transactional-outbox[plots]')")
        return None
    try:
        return draw(summary, path)
    except Exception as exc:
        say(f"no timeline picture: {type(exc).__name__}: {exc}")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Redraw a chaos run's timeline picture.")
    parser.add_argument("summary", type=Path, help="a reports/chaos-seed<N>.json")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the PNG (default: beside the summary)")
    args = parser.parse_args(argv)
    try:
        summary = json.loads(args.summary.read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read {args.summary}: {exc}")
    drawn = draw_or_skip(summary, args.out or png_for(args.summary))
    if drawn is None:
        return 1
    print(f"timeline: {drawn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
