"""When each kind of fault fires: a target count per run, spread over what is left.

Each kind runs in its own thread, one fault after another, one fault per slot. A slot
starts where the previous one ended (or, if that fault overran it, when the fault
ended) and is the time left divided by the faults still to do; the fault starts at a
random moment of its slot early enough to end inside it, going by how long a fault of
this kind takes (the longest of its recent ones, or a prior before the first). A fault
that ran long shrinks the later slots instead of pushing faults past the end, so the
target is met whenever each fault takes no longer than the run's length divided by the
target. A fault that missed its window (a crash point not reached, no send in flight)
does not count; the next slot starts at once, the rest spread over what is left. The
last fault a kind still needs starts early enough for one more attempt to fit after a
miss (which may take as long as the aim's limit, longer than a quick hit), so a short
run whose single window fault misses still gets its hit.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

NOMINAL_PER_10MIN = 55  # faults of each kind per 600 s when no floor is asked for


def floor_for(per_10min: int, duration: float) -> int:
    """The floor for a run of `duration` seconds: `per_10min` pro rata, rounded down."""
    return math.floor(per_10min * duration / 600) if per_10min else 0


def target_for(floor: int, duration: float, nominal: int = NOMINAL_PER_10MIN,
               least: int = 1) -> int:
    """Aim above the floor (by a fifth), at the nominal rate (per 600 s) at least, and at
    `least` at least."""
    return max(least, math.ceil(floor * 1.2), round(nominal * duration / 600))


@dataclass
class KindSchedule:
    """The schedule of one kind of fault; times are seconds since the run started."""

    duration: float
    target: int
    prior: float  # how long a fault of this kind is expected to take, before we know
    miss: float = 0.0  # how long an attempt may wait before it gives up (a window's aim)
    done: int = 0
    missed: int = 0
    durations: list[float] = field(default_factory=list)
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=5))
    _slot_end: float = 0.0

    @property
    def expected(self) -> float:
        return max(self._recent) if self._recent else self.prior

    def next_delay(self, now: float, u: float) -> float:
        """Seconds to wait before the next fault; `u` is uniform in [0, 1)."""
        start = max(now, self._slot_end)
        if self.done < self.target:
            length = max(0.0, self.duration - start) / (self.target - self.done)
        else:
            length = self.duration / self.target  # past the target: the nominal pace
        self._slot_end = start + length
        room = self.expected + (max(self.expected, self.miss)
                                if self.target - self.done == 1 else 0.0)
        return start - now + max(0.0, length - room) * u

    def finished(self, seconds: float, hit: bool) -> None:
        self.durations.append(seconds)
        self._recent.append(seconds)
        if hit:
            self.done += 1
        else:
            self.missed += 1
            self._slot_end = 0.0  # the next attempt need not wait for this slot's end

    def feasible(self, now: float, floor: int) -> bool:
        """Can the floor still be reached at the pace measured so far?"""
        need = floor - self.done
        return need <= 0 or need * self.expected <= max(0.0, self.duration - now)
