"""`make bench` (python -m benchmarks [NAME...]): run the benchmarks, print one table of
every figure beside its ceiling (measured in the same run) and the issue's target,
write reports/bench.json and the plots (reports/throughput.png, latency.png, e2e.png).

Each bench_NAME.py module has `run(db_url, kafka) -> list[Result]`, and GC_TUNED = False
if it measures application code rather than a worker (see `collector`). Environment:
BENCH_STORAGE=0 skips the 3-cycle storage part of `backlog`; BENCH_SCALE=0.02 shrinks
every size and duration for a quick check of the benchmarks themselves.
"""

from __future__ import annotations

import gc
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

from benchmarks import plots
from benchmarks.common import Result, env, machine, scale
from outbox import gctune

#: The story's order: throughput against the ceilings, then backlog, write path,
#: latency, and the consumer; any other bench_*.py after them.
ORDER = ["relay", "backlog", "write", "latency", "exactly_once", "consumer", "e2e", "restart"]


def available() -> list[str]:
    found = {m.name[len("bench_"):] for m in pkgutil.iter_modules([str(Path(__file__).parent)])
             if m.name.startswith("bench_")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def row(r: Result) -> str:
    ceiling = f"{r.ceiling:,.1f} {r.ceiling_name}" if r.ceiling else ""
    ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
    target = ""
    if r.target is not None:
        op = ">=" if r.target[0] == ">=" else "<="
        target = f"{op}{r.target[1]:.3g} {'met' if r.met else 'MISSED'}"
    return (f"{r.group:<8} {r.name:<50} {r.value:>11,.1f} {r.unit:<9} {ceiling:<38} "
            f"{ratio:>6}  {target:<13} {r.note}")


def table(results: list[Result]) -> str:
    head = (f"{'bench':<8} {'figure':<50} {'value':>11} {'unit':<9} "
            f"{'ceiling (same run)':<38} {'ratio':>6}  {'target':<13} note")
    return "\n".join([head, "-" * len(head), *(row(r) for r in results)])


def collector(tuned: bool) -> None:
    """The relay and consumer run in this process as `outbox relay` and `outbox consume`
    run them, with the collector tuned (outbox.gctune), and so do the raw clients they
    are compared with; a benchmark of application code (GC_TUNED = False: the write
    path) gets the interpreter's defaults, as an application has them."""
    if gc.get_freeze_count():
        gc.unfreeze()
    gc.set_threshold(*_DEFAULT_GC)
    if tuned:
        gctune.tune()


_DEFAULT_GC = gc.get_threshold()


def main(argv: list[str]) -> int:
    db_url, kafka = env()
    names = argv or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(available())}",
              file=sys.stderr)
        return 2
    if scale() != 1:
        print(f"BENCH_SCALE={scale():g}: sizes and durations scaled, figures not comparable")
    results: list[Result] = []
    failed: list[str] = []
    began = time.monotonic()
    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        started = time.monotonic()
        tuned = getattr(module, "GC_TUNED", True)
        collector(tuned)
        print(f"== {name}" + ("" if tuned else " (the interpreter's default collector "
                              "settings: it measures application code)"), flush=True)
        try:
            got = module.run(db_url, kafka)
        except Exception as exc:  # one broken benchmark must not cost the others' figures
            failed.append(name)
            print(f"   {name} FAILED: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}",
                  flush=True)
            continue
        for r in got:
            r.group = name
            print(f"   {row(r)}", flush=True)
        results.extend(got)
        print(f"   ({time.monotonic() - started:.0f}s)", flush=True)
    elapsed = time.monotonic() - began
    out = Path("reports")
    out.mkdir(exist_ok=True)
    head = json.dumps({"machine": machine(), "seconds": round(elapsed), "scale": scale()})
    rows = ",\n  ".join(json.dumps(r.as_dict(), default=str) for r in results)
    (out / "bench.json").write_text(f'{head[:-1]}, "results": [\n  {rows}\n]}}\n')
    pictures = plots.write(results, out)
    print(f"\n{table(results)}\n")
    print(f"machine: {machine()}")
    print(f"took {elapsed / 60:.1f} min; written: reports/bench.json"
          + "".join(f", {p}" for p in pictures))
    if failed:
        print(f"FAILED: {', '.join(failed)} (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
