"""Run every benchmark and print one table: `python -m benchmarks [--quick] [--only NAME]`.

Each `benchmarks/bench_*.py` module exposes `run(quick: bool) -> list[dict]` with the keys
`name, unit, value, baseline_name, baseline_value, ratio, goal, met` (see `_report.py`). The
runner imports each in turn, calls it, and keeps going when one fails: the failure becomes an
error row and the exit code is 1. Results go to `benchmarks/results/latest.json`; the run before
is kept as `previous.json`, and its ratios are printed beside this run's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import _report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: `--quick` should finish in this many seconds overall; modules over their share are named.
QUICK_BUDGET_S = 120.0


def discover() -> list[str]:
    """Names of the benchmark modules (`bench_*.py`), sorted."""
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def select(names: Sequence[str], only: Sequence[str]) -> list[str]:
    """Keep the modules named in `only` (`middleware` or `bench_middleware`); all when empty.

    Raises:
        SystemExit: A name matches no module (a typo should not run nothing silently).
    """
    if not only:
        return list(names)
    wanted = {o if o.startswith("bench_") else f"bench_{o}" for o in only}
    unknown = wanted - set(names)
    if unknown:
        raise SystemExit(
            f"unknown benchmark(s): {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(n.removeprefix('bench_') for n in names)}"
        )
    return [n for n in names if n in wanted]


def run_module(name: str, quick: bool) -> tuple[list[dict[str, Any]], float, str | None]:
    """Import and run one module: (rows, seconds, error). Never raises for the module's faults."""
    began = time.monotonic()
    try:
        module = importlib.import_module(f"benchmarks.{name}")
        raw = module.run(quick)
        if not isinstance(raw, list):
            raise TypeError(f"run() returned {type(raw).__name__}, not a list")
        rows = [_report.normalize(r, name) for r in raw]
    except (Exception, SystemExit) as exc:  # a module's failure must not end the run
        traceback.print_exc(file=sys.stderr)
        return (
            [_report.error_row(name, exc)],
            time.monotonic() - began,
            f"{type(exc).__name__}: {exc}",
        )
    return rows, time.monotonic() - began, None


def _load_previous(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    results = data.get("results") if isinstance(data, dict) else None
    return [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="sf-lifecycle against baselines run beside it"
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (< 2 min)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this module (e.g. middleware); repeatable",
    )
    parser.add_argument("--list", action="store_true", help="list the modules and exit")
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS, help="where latest.json is written"
    )
    args = parser.parse_args(argv)

    names = discover()
    if args.list:
        print("\n".join(n.removeprefix("bench_") for n in names))
        return 0
    names = select(names, args.only)

    date = _report.utc_now()
    rows: list[dict[str, Any]] = []
    modules: dict[str, dict[str, Any]] = {}
    began = time.monotonic()
    for name in names:
        print(f"running {name}{' (quick)' if args.quick else ''} ...", file=sys.stderr, flush=True)
        got, seconds, error = run_module(name, args.quick)
        rows += got
        modules[name] = {"seconds": round(seconds, 1), "error": error}
        print(f"  {name}: {len(got)} result(s) in {seconds:.1f} s", file=sys.stderr, flush=True)
    total = time.monotonic() - began

    previous = _load_previous(args.results_dir / "latest.json")
    machine = _report.machine_info()
    print()
    print(_report.render_table(rows, previous))
    print()
    print(_report.machine_line(date, machine, args.quick))
    timing = ", ".join(
        f"{n.removeprefix('bench_')} {m['seconds']:.0f} s" for n, m in modules.items()
    )
    print(f"took {total:.0f} s ({timing})")
    if args.quick and total > QUICK_BUDGET_S:
        slow = max(modules, key=lambda n: modules[n]["seconds"])
        print(f"warning: --quick took over {QUICK_BUDGET_S:.0f} s; slowest: {slow}")

    report = {
        "date": date,
        "machine": machine,
        "quick": args.quick,
        "only": names if args.only else None,
        "seconds": round(total, 1),
        "modules": modules,
        "results": rows,
    }
    path = _report.write_results(args.results_dir, report)
    print(f"results: {path}")
    return 1 if any(m["error"] for m in modules.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
