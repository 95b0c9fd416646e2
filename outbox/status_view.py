"""`outbox status --watch`: the status as a live Rich view, one frame per interval.

rich is optional (the `status` extra): `require_rich` says how to get it. A frame is a
pure function of two samples (`frame`), so it is tested by rendering it to a string.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from outbox.status import Rates, Status

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

RATE_LABEL = ("published/s is derived, no counter of it exists: positions drawn - backlog "
              "growth - new dead letters (rolled-back writes count as published)")
NO_DRAWN_LABEL = ("published/s unknown: this role may not read the events' position "
                  "sequence; backlog change/s shown")


class StatusUnavailable(Exception):
    """One sample could not be taken (the database away): the view says so and waits."""


def require_rich() -> None:
    """Raise ImportError with the way to install rich when it is missing."""
    try:
        import rich  # noqa: F401
    except ImportError:
        raise ImportError("--watch needs rich: pip install 'transactional-outbox[status]'"
                          ) from None


def frame(current: Status, previous: Status | None = None, problem: str | None = None,
          interval: float | None = None) -> RenderableType:
    """One frame: totals and rates, the backlog per shard, relays, consumer groups."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rates = Rates.between(previous, current) if previous is not None else None
    oldest = current.oldest_pending_seconds
    head = Text()
    head.append(f"outbox status at {current.taken_at:%H:%M:%S}", style="bold")
    if interval is not None:
        head.append(f"  (every {interval:g} s, Ctrl-C to stop)", style="dim")
    head.append(f"\npending {current.pending}   oldest pending "
                f"{f'{oldest:.1f}s' if oldest is not None else '-'}   dead letters ")
    head.append(str(current.dead_letters), style="red bold" if current.dead_letters else "")
    head.append(f"   shards {current.shard_count}   live relays {len(current.relays)}")
    head.append("\n" + _rates_line(rates))
    parts: list[RenderableType] = [head]
    if rates is not None:
        parts.append(Text(RATE_LABEL if rates.published is not None else NO_DRAWN_LABEL,
                          style="dim"))
    if problem:
        parts.append(Text(f"not updated: {problem}", style="red"))

    shards = Table(title="backlog per shard", title_justify="left")
    for name in ("shard", "pending", "oldest", "max attempts", "owner"):
        shards.add_column(name, justify="left" if name == "owner" else "right")
    for s in current.shards:
        owner = current.owner(s.shard)
        if s.shard >= current.shard_count:
            owner_cell = Text("OUTSIDE THE SHARD COUNT", style="red")
        else:
            owner_cell = Text(owner) if owner else Text("NO OWNER", style="red")
        shards.add_row(str(s.shard), str(s.pending), f"{s.oldest_pending_seconds:.1f}s",
                       str(s.max_attempts), owner_cell)
    if not current.shards:
        shards.add_row("-", "0", "-", "-", "")
    parts.append(shards)

    relays = Table(title="live relays", title_justify="left")
    for name in ("relay", "pid", "address", "shards"):
        relays.add_column(name)
    for r in current.relays:
        relays.add_row(r.name, str(r.pid), r.addr or "local",
                       ",".join(map(str, r.shards)) or "none")
    parts.append(relays)

    if current.groups:
        groups = Table(title="consumer groups", title_justify="left")
        for name in ("group", "partition", "committed", "end", "lag", "in retry",
                     "dead letters", "held on"):
            groups.add_column(name, justify="right" if name in ("committed", "end", "lag")
                              else "left")
        for g in current.groups:
            retry = f"{g.retrying_events} (max {g.max_attempts} attempts)" \
                if g.retrying_events else "0"
            dead = ("-" if g.dead_letter_topics is None else ", ".join(
                f"{t} {n}" for t, n in g.dead_letter_topics.items()) or "no topic")
            where = (Text(g.error, style="red") if g.error else
                     Text("no --kafka" if g.partitions is None else "all", style="dim"))
            groups.add_row(Text(g.group, style="bold"), where, "", "",
                           "-" if g.lag is None else str(g.lag), retry, dead, "")
            for p in g.partitions or ():
                held = (Text(f"{p.held.event_id} ({p.held.attempts} attempts)", style="yellow")
                        if p.held else Text(""))
                groups.add_row("", f"{p.topic}[{p.partition}]", str(p.committed), str(p.end),
                               str(p.lag), "", "", held)
        parts.append(groups)
    return Group(*parts)


def _rates_line(rates: Rates | None) -> str:
    if rates is None:
        return "rates: after the next sample"
    line = f"backlog change {rates.backlog:+.1f}/s"
    if rates.written is not None and rates.published is not None:
        line = (f"written {rates.written:.1f}/s   published ~{rates.published:.1f}/s   "
                + line)
    return line + f"   (over {rates.seconds:.1f} s)"


def watch(sample: Callable[[], Status], interval: float, console: Console | None = None,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Redraw a frame every `interval` seconds until Ctrl-C (which returns quietly). A
    sample that fails (StatusUnavailable) keeps the last frame, marked as not updated."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    current: Status | None = None
    previous: Status | None = None
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                problem = None
                try:
                    previous, current = current, sample()
                except StatusUnavailable as exc:
                    problem = str(exc)
                if current is not None:
                    live.update(frame(current, previous, problem, interval), refresh=True)
                elif problem:
                    live.update(f"not updated: {problem}", refresh=True)
                sleep(interval)
    except KeyboardInterrupt:
        return
