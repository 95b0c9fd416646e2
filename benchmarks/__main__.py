"""`make bench` (python -m benchmarks [NAME...]): run the benchmarks, print one table,
write reports/bench.json. Each bench_*.py module has `run(db_url, kafka) -> list[Result]`."""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

from benchmarks.common import Result, env, machine


def main(argv: list[str]) -> int:
    db_url, kafka = env()
    names = argv or sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(
        [str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    results: list[Result] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        started = time.monotonic()
        print(f"== {name}", flush=True)
        got = module.run(db_url, kafka)
        for r in got:
            ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
            ceiling = f"{r.ceiling:,.1f} ({r.ceiling_name})" if r.ceiling else "-"
            print(f"   {r.name:<48} {r.value:>12,.1f} {r.unit:<10} ceiling {ceiling:<40} "
                  f"ratio {ratio}  {r.note}", flush=True)
        results.extend(got)
        print(f"   ({time.monotonic() - started:.0f}s)", flush=True)
    out = Path("reports")
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps(
        {"machine": machine(), "results": [r.as_dict() for r in results]}, indent=2))
    print(f"machine: {machine()}\nwritten: reports/bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
