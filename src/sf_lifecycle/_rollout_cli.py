"""The command line of `sf-lifecycle rollout`: its arguments, its exit codes and its reports.

    sf-lifecycle rollout --weights FILE --traefik URL [--steps 10,50,100] [--hold 30s]
                         [--max-error-rate 0.01] [--candidate-ready URL] [--dry-run] [--json]
                         [--report FILE]
    sf-lifecycle rollout --weights FILE --abort

What a rollout does is told in `_rollout.py`; this module turns the arguments into `Options`
(refusing bad values with exit 2 before anything is read), dispatches to the rollout, `--abort`
(`_rollout_lock.py`) or `--dry-run`, and prints the JSON summary (`_rollout_report.py`).

`--report FILE` also writes the upgrade report (`report.py`): each service's requests and 5xx
from the metrics read during the holds, and the weights each time Traefik served new ones
(`weights_timeline` in the JSON summary too), whatever the rollout's outcome once it started
(its first weights written; a rollout refused or interrupted before that writes none). It
needs the `report` extra, and FILE must be writable and outside the weights file's directory
(Traefik watches it; the report must never replace the weights): otherwise the rollout refuses
to start.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from ._gate import Gate, fmt_s
from ._infra_common import parse_duration_ms
from ._rollout import (
    EXIT_INTERRUPTED,
    EXIT_PROMOTED,
    EXIT_REFUSED,
    Interrupted,
    Options,
    Rollout,
    RolloutRefused,
    Signals,
    describe_plan,
    run_rollout,
)
from ._rollout_lock import DirLock, abort
from ._rollout_report import Report, Samples
from ._weights import WeightsError, WeightsFile

__all__ = ["COMMAND", "add_arguments", "parse_steps", "run"]

#: Bounds of `--hold`: shorter than a scrape is noise, longer than an hour is a typo.
MIN_HOLD_S, MAX_HOLD_S = 0.1, 3600.0
MIN_INTERVAL_S = 0.05


def parse_steps(text: str) -> list[int]:
    """`10,50,100` -> [10, 50, 100]: candidate weights in percent, strictly increasing, 1..100.

    Raises:
        ValueError: anything else, with what is allowed.
    """
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--steps {text!r}: expected integers like 10,50,100") from None
    if not steps or any(not 1 <= s <= 100 for s in steps):
        raise ValueError(f"--steps {text!r}: each step is a weight in percent, 1..100")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"--steps {text!r}: steps must increase")
    return steps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `sf-lifecycle rollout`."""
    parser.description = (
        "Promote a candidate through a Traefik weighted service, step by step, each step gated "
        "on Traefik's metrics; roll back to the stable at once on a breach."
    )
    a = parser.add_argument
    a("--weights", required=True, type=Path, metavar="FILE", help="Traefik dynamic-config YAML")
    a("--traefik", metavar="URL", help="Traefik's internal entrypoint (API and /metrics)")
    a("--steps", default="10,50,100", help="candidate weights in percent (default 10,50,100)")
    a("--hold", default="30s", help="hold per step, e.g. 30s, 500ms (default 30s)")
    a("--interval", default="500ms", help="how often the hold is judged (default 500ms)")
    a("--max-error-rate", type=float, default=0.01, help="largest 5xx share (default 0.01)")
    a("--max-latency-ratio", type=float, default=2.0, help="candidate/stable p99 (default 2)")
    a("--latency-floor", default="100ms", help="p99 that never breaches (default 100ms)")
    a("--min-requests", type=int, default=20, help="candidate requests per hold (default 20)")
    a("--candidate-ready", metavar="URL", help="must answer 200 before the first step")
    a(
        "--candidate-health",
        metavar="URL",
        action="append",
        default=[],
        help="the candidate's /api/healthz, for its requests in flight (default: each of its "
        "servers in Traefik + /api/healthz); repeat for several replicas",
    )
    a("--stable", metavar="NAME", help="stable child (default: the one not ending in -candidate)")
    a("--candidate", metavar="NAME", help="candidate child (default: the one ending in -candidate)")
    a("--service", metavar="NAME", help="the weighted service, when the file has several")
    a("--dry-run", action="store_true", help="print the plan (and pre-flight), change nothing")
    a("--abort", action="store_true", help="set stable 100, candidate 0 and exit")
    a("--json", action="store_true", help="print one JSON summary on stdout")
    a("--report", type=Path, metavar="FILE", help="write the upgrade report (HTML) to FILE")


def _options(args: argparse.Namespace) -> Options:
    def seconds(flag: str, raw: str) -> float:
        try:
            return parse_duration_ms(raw) / 1000
        except ValueError as exc:
            raise RolloutRefused(f"{flag}: {exc}") from None

    try:
        steps = parse_steps(args.steps)
    except ValueError as exc:
        raise RolloutRefused(str(exc)) from None
    if args.report is not None and importlib.util.find_spec("plotly") is None:
        raise RolloutRefused(
            f"--report {args.report}: the report needs plotly: pip install 'sf-lifecycle[report]'"
        )
    hold = seconds("--hold", args.hold)
    interval = seconds("--interval", args.interval)
    floor = seconds("--latency-floor", args.latency_floor)
    if not MIN_HOLD_S <= hold <= MAX_HOLD_S:
        raise RolloutRefused(
            f"--hold {args.hold}: expected {fmt_s(MIN_HOLD_S)} to {MAX_HOLD_S / 60:.0f}m "
            f"(a shorter hold measures nothing, a longer one is a typo)"
        )
    if not MIN_INTERVAL_S <= interval <= hold:
        raise RolloutRefused(
            f"--interval {args.interval}: expected {fmt_s(MIN_INTERVAL_S)} up to --hold"
        )
    if not (math.isfinite(args.max_error_rate) and 0 <= args.max_error_rate < 1):
        raise RolloutRefused(f"--max-error-rate {args.max_error_rate}: expected 0 <= rate < 1")
    if not (math.isfinite(args.max_latency_ratio) and args.max_latency_ratio >= 1):
        raise RolloutRefused(
            f"--max-latency-ratio {args.max_latency_ratio}: expected a finite number >= 1"
        )
    if not math.isfinite(floor) or floor < 0:
        raise RolloutRefused(f"--latency-floor {args.latency_floor}: expected a duration >= 0")
    if args.min_requests < 0:
        raise RolloutRefused(f"--min-requests {args.min_requests}: expected >= 0")
    gate = Gate(args.max_error_rate, args.max_latency_ratio, floor, args.min_requests)
    return Options(
        args.weights,
        args.traefik,
        steps,
        hold,
        interval,
        gate,
        args.candidate_ready,
        args.stable,
        args.candidate,
        args.service,
        list(args.candidate_health),
    )


def run(args: argparse.Namespace) -> int:
    """Run `rollout`: 0 promoted (aborted, dry run), 1 rolled back, 2 refused, 130 interrupted."""
    progress: TextIO = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=progress, flush=True)

    report = Report("refused", str(args.weights))
    samples: list[tuple[float, dict[str, tuple[float, float]]]] = []
    code = EXIT_REFUSED
    started = False  # a first step's weights were written: the report is due
    wf: WeightsFile | None = None
    lock: DirLock | None = None
    signals = Signals()
    try:
        signals.__enter__()
        opts = _options(args)
        wf = WeightsFile.load(
            opts.weights, stable=opts.stable, candidate=opts.candidate, service=opts.service
        )
        report = Report("refused", str(wf.path), wf.service, wf.stable, wf.candidate, wf.weights)
        report.weights_after = wf.weights  # until something is written
        if args.report is not None and not args.abort:
            _check_report_path(args.report, wf)
        lock = DirLock(wf.target.parent)
        if args.abort and args.dry_run:
            wf.check_rewritable()
            stable_100 = {wf.stable: 100, wf.candidate: 0}
            report.result = "dry_run"
            report.plan = [
                f"abort          would write {stable_100} to {wf.path} (now {wf.weights})"
            ]
            say(report.plan[0] + "; dry run: nothing changed")
            code = EXIT_PROMOTED
        elif args.abort:
            signals.shield()  # short; an abort is not left half done
            wf.check_rewritable()
            after = abort(wf, lock, say)
            report.result, report.weights_after = "aborted", after.weights
            say(f"aborted: {wf.path}: {wf.weights} -> {after.weights}")
            code = EXIT_PROMOTED
        elif args.dry_run:
            report.result, report.plan = "dry_run", describe_plan(opts, wf)
            report.weights_after = wf.weights
            for line in report.plan:
                say(line)
            code = EXIT_PROMOTED
            if opts.traefik:
                Rollout(opts, wf, say, signals).preflight()
                say("pre-flight     ok (nothing changed: dry run)")
        else:
            if not opts.traefik:
                raise RolloutRefused("--traefik URL is required (Traefik's internal entrypoint)")
            if not lock.try_acquire():
                raise RolloutRefused(
                    f"another rollout is running on {wf.path} (it holds the lock on "
                    f"{lock.directory}); wait for it, or stop it with --abort"
                )
            code, report, samples, started = run_rollout(opts, wf, say, signals)
    except Interrupted:
        # Before anything was written (pre-flight, plan): nothing to roll back.
        report.result, report.reason = "interrupted", "interrupted before the first step"
        say("interrupted before the first step; nothing changed")
        code = EXIT_INTERRUPTED
    except (RolloutRefused, WeightsError) as exc:
        report.result, report.reason = "refused", str(exc)
        print(f"rollout: refused: {exc}", file=sys.stderr)
        code = EXIT_REFUSED
    except OSError as exc:
        report.result, report.reason = "refused", str(exc)
        print(f"rollout: {exc}", file=sys.stderr)
        code = EXIT_REFUSED
    finally:
        signals.__exit__()
        if lock is not None:
            lock.close()
    if args.json:
        print(json.dumps(asdict(report), sort_keys=False))
    if args.report is not None and started and wf is not None:
        _write_report(args.report, wf, report, samples, say)
    return code


def _check_report_path(path: Path, wf: WeightsFile) -> None:
    """Refuse a report path that could replace the weights file or land in the directory
    Traefik watches (by name, symbolic link or hard link), or that cannot be written.

    Raises:
        RolloutRefused: naming `path` and why.
    """
    from .report import report_path_problem

    out = path.resolve()
    weights = {wf.path.resolve(), wf.target.resolve()}
    watched = {Path(os.path.abspath(wf.path)).parent.resolve(), *(w.parent for w in weights)}
    if out in weights or any(_same_file(path, w) for w in weights):
        raise RolloutRefused(
            f"--report {path}: that is the weights file {wf.path}; the report must never "
            f"replace it: write the report elsewhere"
        )
    for d in sorted(watched):
        if out == d or out.is_relative_to(d):
            raise RolloutRefused(
                f"--report {path}: in {d}, the weights file's directory, which Traefik "
                f"watches: write the report elsewhere"
            )
    problem = report_path_problem(path)
    if problem:
        raise RolloutRefused(f"--report {path}: {problem}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # `a` does not exist yet
        return False


def _write_report(
    path: Path,
    wf: WeightsFile,
    report: Report,
    samples: Samples,
    say: Callable[[str], None],
) -> None:
    from .report import ReportUnavailable, UpgradeTimeline, write_report

    timeline = UpgradeTimeline.from_rollout(asdict(report), samples)
    try:
        _check_report_path(path, wf)  # again: links may have moved during the rollout
        written = write_report(timeline, path)
    except RolloutRefused as exc:
        print(f"rollout: report not written: {exc}", file=sys.stderr)
        return
    except (ReportUnavailable, OSError) as exc:
        # The exit code still says what the rollout did.
        print(f"rollout: report not written: {exc}", file=sys.stderr)
        return
    say(f"report: {written} ({written.stat().st_size / 1e6:.1f} MB)")


#: `(add_arguments, run)` for the `rollout` sub-command of `sf-lifecycle`.
COMMAND = (add_arguments, run)
