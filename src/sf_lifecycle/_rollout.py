"""A gated blue/green promotion through Traefik's weighted services: `sf-lifecycle rollout`.

`FILE` holds the weighted service that the production router points at (see `_weights.py`);
`URL` is Traefik's internal entrypoint, serving both its API and `/metrics`. The candidate starts
at weight 0 and is verified through its own router before this command runs.

1. Pre-flight: no other rollout holds this file (an exclusive `flock` on its directory, kept
   for the whole rollout); the file holds stable 100 / candidate 0 (otherwise: `--abort`
   first) and its weights can be rewritten (tried in memory); Traefik serves the weighted
   service from this file, reports every server of the candidate `UP`, and its `/metrics`
   has series labelled with both children's services (the pools' health checks give them
   even without traffic: without `addServicesLabels` there are none); the candidate's
   `/api/healthz` reports its requests in flight; `--candidate-ready` (when given) answers
   200. Otherwise exit 2 and the weights are untouched.
2. Each step writes the candidate's weight (the stable gets the rest of 100), waits until
   Traefik's API shows the new weights, then holds. During the hold the per-service counters of
   Traefik's metrics are compared with their values at the start of the step. The candidate's
   5xx ratio is judged continuously: with at least `--min-requests` served, more than
   `--max-error-rate` of them failing is a breach; with fewer, the errors are divided by
   `--min-requests` instead, so a burst of errors is a breach before enough traffic arrived
   to compute a ratio. The candidate leaving Traefik's pool (no server `UP`) is a breach at
   once. At the end of the hold the candidate must have served `--min-requests`, and its p99
   latency (interpolated linearly inside the duration histogram's buckets, as PromQL does)
   must not exceed the stable's by more than `--max-latency-ratio` (the stable's is taken
   over the whole rollout, so the last step, where the stable gets no new traffic, still has
   a reference; p99s under `--latency-floor` never breach: the buckets are coarse).
   Traefik counts a request only once it ends, so a candidate whose requests hang would look
   clean: the candidate's `/api/healthz` says how long its requests in flight have run, and
   those running longer than the latency limit count as slower than every bucket; more than
   1 % of them is a breach on its own.
3. A breach writes stable 100 / candidate 0 at once and exits 1 with what was measured. After
   the last step the candidate has 100 and the command exits 0. Ctrl-C or SIGTERM also rolls
   back (exit 130); further signals are ignored until the rollback is written and loaded, and
   one during the pre-flight exits 130 with nothing changed. SIGKILL cannot be caught: the
   last weights written stay, and `rollout --abort` restores stable 100.

The stable's ratio is reported beside the candidate's; since it is never negative, "under
`--max-error-rate`" also means "no more than the stable's plus that margin". When the stable
fails as much, the report says so: the fault may lie in a shared dependency.

Every `--interval` and before each write the file must still hold the weights this command wrote
last; if someone else changed them (an `--abort`, an edit), the rollout stops and leaves them
alone. `--abort` does not wait for the lock: an operator's abort always wins. It writes stable
100 at once and, while a rollout still holds the lock, keeps it there until that rollout has
noticed and exited (at most `ABORT_WAIT_S`, see `_rollout_lock.py`).

The modules of the command: `_rollout_cli.py` (arguments, dispatch, reports), this one (the
pre-flight, the steps, the rollback), `_gate.py` (the arithmetic of a step's verdict),
`_traefik_api.py` (what Traefik serves and counts), `_rollout_lock.py` (one rollout per file,
`--abort`), `_rollout_report.py` (the JSON summary), `_weights.py` (the weights file).
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ._gate import Gate, fmt_s
from ._prometheus import ServiceStats
from ._rollout_report import Report, Samples, Side, Step
from ._traefik_api import Scrape, TraefikAPI, qualify
from ._weights import WeightsFile

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PROMOTED",
    "EXIT_REFUSED",
    "EXIT_ROLLED_BACK",
    "Interrupted",
    "Options",
    "Rollout",
    "RolloutRefused",
    "Signals",
    "describe_plan",
    "run_rollout",
]

EXIT_PROMOTED, EXIT_ROLLED_BACK, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130
#: How long pre-flight waits for per-service series (a health-check interval and a margin).
METRICS_WAIT_S = 5.0


class RolloutRefused(Exception):
    """Something to fix before a rollout can start (exit 2); nothing was changed."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM; raised once, later signals are ignored (see `Signals`)."""


class Signals:
    """SIGINT and SIGTERM raise `Interrupted` once; after that, or once `shield()` was called
    (a rollback is being written), they are ignored, so a second Ctrl-C cannot leave the
    candidate at its weight halfway through the rollback."""

    def __init__(self) -> None:
        self.shielded = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.shielded:
            return
        self.shielded = True
        raise Interrupted

    def shield(self) -> None:
        self.shielded = True

    def __enter__(self) -> Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _in_flight_ages(url: str, timeout_s: float = 5.0) -> list[tuple[float, int]]:
    """`[(seconds, count), ...]` from an sf-lifecycle `/api/healthz` (200 or 503 alike).

    Raises:
        OSError: unreachable, or the body has no `in_flight_ages_s`.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            body = r.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    try:
        ages = json.loads(body)["in_flight_ages_s"]
        return [(float(a), int(n)) for a, n in ages]
    except (ValueError, KeyError, TypeError) as exc:
        raise OSError(f"{url} does not report in_flight_ages_s ({exc!r})") from None


def _http_status(url: str, timeout_s: float = 5.0) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


@dataclass
class Options:
    weights: Path
    traefik: str | None
    steps: list[int]
    hold_s: float
    interval_s: float
    gate: Gate
    candidate_ready: str | None = None
    stable: str | None = None
    candidate: str | None = None
    service: str | None = None
    candidate_health: list[str] = field(default_factory=list)
    load_timeout_s: float = 15.0


class Rollout:
    def __init__(
        self,
        opts: Options,
        wf: WeightsFile,
        say: Callable[[str], None],
        signals: Signals | None = None,
    ) -> None:
        self.opts = opts
        self.wf = wf
        self.say = say
        self.signals = signals or Signals()
        self.health_urls: list[str] = list(opts.candidate_health)
        assert opts.traefik is not None
        self.traefik = TraefikAPI(opts.traefik)
        self.weighted = qualify(wf.service)
        self.stable_q = qualify(wf.stable)
        self.candidate_q = qualify(wf.candidate)
        self.report = Report(
            "refused", str(opts.weights), wf.service, wf.stable, wf.candidate, wf.weights
        )
        #: `(unix time, {service: (requests, 5xx)})` at each look at the metrics (the report).
        self.samples: list[tuple[float, dict[str, tuple[float, float]]]] = []
        #: A step's weights were (being) written: from here on the rollout has started.
        self.started = False

    def _weights(self, candidate: int) -> dict[str, int]:
        return {self.wf.stable: 100 - candidate, self.wf.candidate: candidate}

    # -- pre-flight ---------------------------------------------------------------------------
    def preflight(self) -> None:
        """Raise RolloutRefused unless everything the gate relies on is in place."""
        t, wf = self.traefik, self.wf
        wf.check_rewritable()
        if wf.weights != self._weights(0):
            raise RolloutRefused(
                f"{wf.path} holds {wf.weights}, not {wf.stable} 100 / {wf.candidate} 0: a "
                f"rollout starts from the stable. Run `sf-lifecycle rollout --weights "
                f"{wf.path} --abort` first"
            )
        try:
            served = t.weights(self.weighted)
        except (OSError, ValueError) as exc:
            raise RolloutRefused(f"cannot reach Traefik's API at {t.url}: {exc}") from None
        if served is None:
            raise RolloutRefused(
                f"Traefik at {t.url} does not serve weighted service {self.weighted} (absent or "
                f"disabled: a child that does not exist disables it). Is {wf.path} in the file "
                f"provider's watched directory, and is --traefik the internal entrypoint?"
            )
        if served != wf.weights:
            raise RolloutRefused(
                f"Traefik serves {self.weighted} with weights {served}, the file says "
                f"{wf.weights}: it is not watching {wf.path}, or has not reloaded it yet"
            )
        status = t.server_status(self.candidate_q)
        if not status or any(s != "UP" for s in status.values()):
            raise RolloutRefused(
                f"Traefik does not report the candidate {self.candidate_q} UP "
                f"({status or 'no servers'}): start it, wait for its health check, retry"
            )
        if self.opts.candidate_ready:
            got = _http_status(self.opts.candidate_ready)
            if got != 200:
                raise RolloutRefused(
                    f"candidate not ready: {self.opts.candidate_ready} answered {got}, not 200"
                )
        # With no traffic yet, the pools' health-check gauges (`traefik_service_server_up`) are
        # the candidate's only series, and Traefik drops them on every configuration reload
        # until the next health check (checked with Traefik 3.7): wait a little for them.
        deadline = time.monotonic() + METRICS_WAIT_S
        while True:
            try:
                scrape = t.scrape()
            except (OSError, ValueError) as exc:
                raise RolloutRefused(
                    f"cannot read Traefik's metrics at {t.url}/metrics ({exc}); enable "
                    f"metrics.prometheus with addServicesLabels on this entrypoint"
                ) from None
            unlabelled = [n for n in (self.stable_q, self.candidate_q) if n not in scrape.stats]
            if not unlabelled or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        if unlabelled:
            raise RolloutRefused(
                f"Traefik's metrics at {t.url}/metrics have no series labelled "
                f"with service {' or '.join(unlabelled)}: "
                f"nothing to judge the step on. Enable metrics.prometheus.addServicesLabels "
                f"(and a health check on each pool, which gives the series before any traffic)"
            )
        if not self.health_urls:
            # The candidate's healthz under its SF_HEALTH_PREFIX: the path Traefik's own health
            # check of it polls, when it has one.
            checked = t.health_path(self.candidate_q) or "/api/healthz"
            path = checked.rsplit("/", 1)[0] + "/healthz"  # `<prefix>/ready` polled: same prefix
            self.health_urls = [f"{u.rstrip('/')}{path}" for u in status]
        for url in self.health_urls:
            try:
                _in_flight_ages(url)
            except OSError as exc:
                raise RolloutRefused(
                    f"cannot read the candidate's requests in flight at {url} ({exc}); Traefik "
                    f"does not count a request until it ends, so the gate needs them. Pass "
                    f"--candidate-health URL of the candidate's <prefix>/healthz (e.g. through its "
                    f"verification router)"
                ) from None

    # -- steps --------------------------------------------------------------------------------
    def _current(self) -> WeightsFile:
        """The file as it is now; `_ChangedUnderneath` unless it holds what was written last."""
        current = WeightsFile.load(
            self.wf.path,
            stable=self.wf.stable,
            candidate=self.wf.candidate,
            service=self.wf.service,
        )
        if current.weights != self.wf.weights:
            raise _ChangedUnderneath(
                f"{self.wf.path} changed underneath the rollout (weights {current.weights}, "
                f"expected {self.wf.weights}; an --abort?): stopping without writing"
            )
        return current

    def _set(self, weights: dict[str, int], *, force: bool = False) -> None:
        if force:
            current = WeightsFile.load(
                self.wf.path,
                stable=self.wf.stable,
                candidate=self.wf.candidate,
                service=self.wf.service,
            )
        else:
            current = self._current()
            # Set before the write: an interrupt during it still counts as started.
            self.started = True
        self.wf = current.write(weights)
        self.report.weights_after = self.wf.weights

    def _wait_loaded(self, weights: dict[str, int], note: str) -> bool:
        deadline = time.monotonic() + self.opts.load_timeout_s
        while time.monotonic() < deadline:
            try:
                if self.traefik.weights(self.weighted) == weights:
                    self._served(weights, note)
                    return True
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self._served(weights, f"{note} (written; Traefik did not confirm)")
        return False

    def _served(self, weights: Mapping[str, int], note: str) -> None:
        entry = {"t": round(time.time(), 3), "weights": dict(weights), "note": note}
        self.report.weights_timeline.append(entry)

    def _snapshot(self) -> Scrape:
        scrape = self.traefik.scrape()
        self.samples.append(
            (
                time.time(),
                {
                    name.split("@")[0]: (s.requests, s.errors)
                    for name in (self.stable_q, self.candidate_q)
                    if (s := scrape.stats.get(name)) is not None
                },
            )
        )
        return scrape

    def _hanging(self, limit_s: float) -> int:
        """The candidate's requests running for more than `limit_s` (summed over servers)."""
        return sum(
            n for url in self.health_urls for age, n in _in_flight_ages(url) if age > limit_s
        )

    def run(self) -> int:
        self.report.result = "promoted"
        self._served(self.wf.weights, "start")
        started = self._snapshot()
        for i, weight in enumerate(self.opts.steps, 1):
            target = self._weights(weight)
            self._set(target)
            if not self._wait_loaded(target, f"step {weight}%"):
                return self._rollback(f"Traefik did not load weights {target} in time")
            step_start = self._snapshot()
            t0 = time.monotonic()
            end = t0 + self.opts.hold_s
            reason: str | None = None
            now = step_start
            while True:
                time.sleep(max(0.0, min(self.opts.interval_s, end - time.monotonic())))
                self._current()  # an --abort or an edit stops the rollout within an interval
                status = self.traefik.server_status(self.candidate_q)
                now = self._snapshot()
                cand, stab = self._window(now, step_start)
                if not status or all(s != "UP" for s in status.values()):
                    reason = f"candidate left Traefik's pool ({status or 'no servers'})"
                else:
                    reason = self.opts.gate.error_breach(cand, stab)
                if reason or time.monotonic() >= end:
                    break
            cand, stab = self._window(now, step_start)
            if reason is None:
                ref = now.since(self.stable_q, started)
                # Requests still running count too: Traefik has not seen them end. Without a
                # stable reference yet, the stable's history in Traefik gives the limit.
                gate = self.opts.gate
                limit = gate.latency_limit_s(ref) or gate.latency_limit_s(
                    now.stats.get(self.stable_q, ServiceStats())
                )
                hang_limit = limit if limit is not None else gate.latency_floor_s
                hanging = self._hanging(hang_limit)
                reason = gate.end_of_hold(cand, ref, hanging, hang_limit)
            step = Step(
                weight,
                round(time.monotonic() - t0, 3),
                Side.of(self.stable_q, stab),
                Side.of(self.candidate_q, cand),
                "breach" if reason else "ok",
                reason,
            )
            self.report.steps.append(step)
            self.say(
                f"step {i}/{len(self.opts.steps)}  candidate {weight:>3}%  held "
                f"{step.held_s:.1f}s  | {step.stable.line()} | {step.candidate.line()} | "
                f"{step.verdict}"
            )
            if reason:
                return self._rollback(reason)
        if self.opts.steps[-1] != 100:
            self._set(self._weights(100))
            self._wait_loaded(self._weights(100), "promoted")
        self.say(f"promoted: {self.wf.candidate} 100, {self.wf.stable} 0")
        return EXIT_PROMOTED

    def _window(self, now: Scrape, start: Scrape) -> tuple[ServiceStats, ServiceStats]:
        return now.since(self.candidate_q, start), now.since(self.stable_q, start)

    def _rollback(self, reason: str, *, result: str = "rolled_back") -> int:
        self.signals.shield()  # the rollback is short; a second Ctrl-C must not cut it
        target = self._weights(0)
        self._set(target, force=True)
        loaded = self._wait_loaded(target, "rollback")
        self.report.result, self.report.reason = result, reason
        self.say(f"ROLLBACK: {reason}")
        self.say(
            f"weights {self.wf.stable} 100, {self.wf.candidate} 0"
            + ("; Traefik serves them" if loaded else "; Traefik has NOT confirmed them yet")
        )
        return EXIT_INTERRUPTED if result == "interrupted" else EXIT_ROLLED_BACK


class _ChangedUnderneath(Exception):
    pass


def describe_plan(opts: Options, wf: WeightsFile) -> list[str]:
    g = opts.gate
    steps = opts.steps if opts.steps[-1] == 100 else [*opts.steps, 100]
    return [
        f"weights file   {wf.path} (weighted service {wf.service})",
        f"stable         {wf.stable}   candidate {wf.candidate}   now {wf.weights}",
        f"steps          candidate {' -> '.join(f'{s}%' for s in steps)}, hold "
        f"{fmt_s(opts.hold_s)} each"
        + ("" if opts.steps[-1] == 100 else " (100% set at the end, without a hold)"),
        f"gate           5xx <= {g.max_error_rate:.1%}, p99 <= max({g.max_latency_ratio:g} x "
        f"stable, {fmt_s(g.latency_floor_s)}), >= {g.min_requests} candidate requests per "
        f"hold, candidate UP in Traefik",
        "on breach      stable 100, candidate 0 at once; exit 1",
    ]


def run_rollout(
    opts: Options, wf: WeightsFile, say: Callable[[str], None], signals: Signals
) -> tuple[int, Report, Samples, bool]:
    """Pre-flight and rollout: the exit code, the report, the metrics samples, and whether a
    first step's weights were written (an interrupt before that propagates: nothing changed)."""
    rollout = Rollout(opts, wf, say, signals)
    rollout.preflight()
    for line in describe_plan(opts, wf):
        say(line)
    try:
        code = rollout.run()
    except Interrupted:
        code = rollout._rollback("interrupted (Ctrl-C or SIGTERM)", result="interrupted")
    except _ChangedUnderneath as exc:
        rollout.report.result, rollout.report.reason = "stopped", str(exc)
        say(f"STOPPED: {exc}")
        code = EXIT_ROLLED_BACK
    except (OSError, ValueError) as exc:
        # Traefik unreachable, metrics unreadable, the file unreadable: judge nothing blind.
        code = rollout._rollback(f"stopped by an error: {exc}")
    rollout.report.weights_after = rollout.wf.weights
    return code, rollout.report, rollout.samples, rollout.started
