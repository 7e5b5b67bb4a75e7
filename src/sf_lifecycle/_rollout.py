"""A gated blue/green promotion through Traefik's weighted services: `sf-lifecycle rollout`.

    sf-lifecycle rollout --weights FILE --traefik URL [--steps 10,50,100] [--hold 30s]
                         [--max-error-rate 0.01] [--candidate-ready URL] [--dry-run] [--json]
                         [--report FILE]
    sf-lifecycle rollout --weights FILE --abort

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
noticed and exited (at most `ABORT_WAIT_S`).

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
import fcntl
import importlib.util
import itertools
import json
import math
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from ._infra_common import parse_duration_ms
from ._prometheus import ServiceStats, process_start, service_stats
from ._weights import WeightsError, WeightsFile

__all__ = ["COMMAND", "Gate", "RolloutRefused", "parse_steps", "qualify"]

#: The weighted service lives in a file of Traefik's file provider.
FILE_PROVIDER = "file"
EXIT_PROMOTED, EXIT_ROLLED_BACK, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Bounds of `--hold`: shorter than a scrape is noise, longer than an hour is a typo.
MIN_HOLD_S, MAX_HOLD_S = 0.1, 3600.0
MIN_INTERVAL_S = 0.05
#: How long pre-flight waits for per-service series (a health-check interval and a margin).
METRICS_WAIT_S = 5.0
#: How long `--abort` keeps the file at stable 100 while a running rollout notices and exits.
ABORT_WAIT_S = 10.0
#: The share of a candidate's requests that may run longer than the latency limit (p99).
HANGING_SHARE = 0.01


class RolloutRefused(Exception):
    """Something to fix before a rollout can start (exit 2); nothing was changed."""


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM; raised once, later signals are ignored (see `_Signals`)."""


class _Signals:
    """SIGINT and SIGTERM raise `_Interrupted` once; after that, or once `shield()` was called
    (a rollback is being written), they are ignored, so a second Ctrl-C cannot leave the
    candidate at its weight halfway through the rollback."""

    def __init__(self) -> None:
        self.shielded = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.shielded:
            return
        self.shielded = True
        raise _Interrupted

    def shield(self) -> None:
        self.shielded = True

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class _DirLock:
    """An exclusive `flock` on the weights file's directory: no extra file in the directory
    Traefik watches, and the kernel drops it when the process dies, even by SIGKILL."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd = os.open(directory, os.O_RDONLY)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        os.close(self._fd)


def qualify(name: str, provider: str = FILE_PROVIDER) -> str:
    """Traefik's full name of a service referenced from a file: `sf` -> `sf@file`."""
    return name if "@" in name else f"{name}@{provider}"


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


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


@dataclass(frozen=True, slots=True)
class Gate:
    """What a step must satisfy; the arithmetic lives here so it can be tested on its own.

    Args:
        max_error_rate: Largest share of the candidate's requests that may answer 5xx.
        max_latency_ratio: Largest candidate p99 / stable p99.
        latency_floor_s: A candidate p99 at or under this never breaches.
        min_requests: Requests the candidate must serve in a hold to be judged.
    """

    max_error_rate: float = 0.01
    max_latency_ratio: float = 2.0
    latency_floor_s: float = 0.1
    min_requests: int = 20

    def error_breach(self, candidate: ServiceStats, stable: ServiceStats) -> str | None:
        """A reason when the candidate fails too often; judged at any time during the hold."""
        if candidate.errors <= 0:
            return None
        judged = max(candidate.requests, float(self.min_requests))
        if candidate.errors / judged <= self.max_error_rate:
            return None
        reason = (
            f"candidate answered 5xx to {candidate.errors:.0f} of {candidate.requests:.0f} "
            f"requests ({candidate.error_ratio:.1%}), over --max-error-rate "
            f"{self.max_error_rate:.1%}; stable {stable.error_ratio:.1%}"
        )
        if stable.requests >= self.min_requests and stable.error_ratio > self.max_error_rate:
            reason += " (the stable fails too: check shared dependencies)"
        return reason

    def latency_limit_s(self, stable_reference: ServiceStats) -> float | None:
        """max(stable p99 x ratio, floor); None without enough stable traffic to compare."""
        s = stable_reference.p99_s()
        if s is None or stable_reference.requests < self.min_requests:
            return None
        return max(s * self.max_latency_ratio, self.latency_floor_s)

    def end_of_hold(
        self,
        candidate: ServiceStats,
        stable_reference: ServiceStats,
        hanging: int = 0,
        hang_limit_s: float | None = None,
    ) -> str | None:
        """A reason when the finished hold does not let the candidate pass.

        Args:
            candidate: The candidate's requests that ended during the hold.
            stable_reference: The stable's over the whole rollout.
            hanging: The candidate's requests still running after more than `hang_limit_s`;
                Traefik's metrics cannot see them yet. They count as slower than every bucket.
            hang_limit_s: The limit `hanging` was counted against (for the message).
        """
        if hanging > 0 and hanging > HANGING_SHARE * (candidate.requests + hanging):
            return (
                f"{hanging} of the candidate's requests still running after more than "
                f"{_fmt_s(hang_limit_s)} (the latency limit), "
                f"{hanging / (candidate.requests + hanging):.1%} of "
                f"{candidate.requests + hanging:.0f}: more than {HANGING_SHARE:.0%} hang"
            )
        candidate = candidate.with_unfinished(hanging)
        if candidate.requests < self.min_requests:
            return (
                f"candidate served {candidate.requests:.0f} requests in the hold, fewer than "
                f"--min-requests {self.min_requests}: not enough traffic to judge it "
                f"(lengthen --hold or lower --min-requests)"
            )
        reason = self.error_breach(candidate, stable_reference)
        if reason:
            return reason
        c, s = candidate.p99_s(), stable_reference.p99_s()
        limit = self.latency_limit_s(stable_reference)
        if c is None or s is None or limit is None:
            return None  # no stable reference: the latency gate cannot apply
        if c > limit:
            return (
                f"candidate p99 {_fmt_s(c)} over {_fmt_s(limit)} (stable p99 {_fmt_s(s)} x "
                f"--max-latency-ratio {self.max_latency_ratio:g}, floor "
                f"{_fmt_s(self.latency_floor_s)})"
            )
        return None


# -- Traefik ------------------------------------------------------------------------------------
class Traefik:
    """Traefik's internal entrypoint: the API and `/metrics` (stdlib HTTP, short timeouts)."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=self.timeout_s) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def service(self, name: str) -> dict[str, Any] | None:
        status, body = self._get(f"/api/http/services/{name}")
        if status == 404:
            return None
        if status != 200:
            raise OSError(f"Traefik API answered {status} for service {name}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def server_status(self, name: str) -> dict[str, str]:
        svc = self.service(name)
        return dict((svc or {}).get("serverStatus") or {})

    def weights(self, name: str) -> dict[str, int] | None:
        svc = self.service(name)
        if svc is None or svc.get("status") != "enabled":
            return None
        children = (svc.get("weighted") or {}).get("services") or []
        return {str(c["name"]): int(c.get("weight", 1)) for c in children}

    def scrape(self) -> Scrape:
        status, body = self._get("/metrics")
        if status != 200:
            raise OSError(f"Traefik's /metrics answered {status}")
        text = body.decode("utf-8", "replace")
        return Scrape(process_start(text), service_stats(text))


@dataclass(frozen=True, slots=True)
class Scrape:
    """One read of Traefik's `/metrics`: its start time and the per-service counters."""

    started: float | None
    stats: Mapping[str, ServiceStats]

    def since(self, name: str, earlier: Scrape) -> ServiceStats:
        """`name`'s traffic since `earlier`; all of it when Traefik restarted in between."""
        now = self.stats.get(name, ServiceStats())
        if earlier.started is not None and self.started != earlier.started:
            return now.since(ServiceStats())
        return now.since(earlier.stats.get(name, ServiceStats()))


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


# -- the rollout --------------------------------------------------------------------------------
@dataclass
class Side:
    """One service's traffic in one window."""

    service: str
    requests: int
    errors: int
    error_ratio: float
    p99_s: float | None

    @classmethod
    def of(cls, service: str, s: ServiceStats) -> Side:
        return cls(service, int(s.requests), int(s.errors), round(s.error_ratio, 4), s.p99_s())

    def line(self) -> str:
        return f"{self.service}: {self.requests} req, {self.errors} 5xx, p99 {_fmt_s(self.p99_s)}"


@dataclass
class Step:
    weight: int
    held_s: float
    stable: Side
    candidate: Side
    verdict: str  # "ok" or "breach"
    reason: str | None = None


@dataclass
class Report:
    result: str  # promoted, rolled_back, refused, aborted, interrupted, dry_run
    weights_file: str
    service: str | None = None
    stable: str | None = None
    candidate: str | None = None
    weights_before: dict[str, int] = field(default_factory=dict)
    weights_after: dict[str, int] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    reason: str | None = None
    plan: list[str] = field(default_factory=list)
    #: `{"t": unix time, "weights": {...}, "note": ...}` each time Traefik served new weights.
    weights_timeline: list[dict[str, Any]] = field(default_factory=list)


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


class _Rollout:
    def __init__(
        self,
        opts: Options,
        wf: WeightsFile,
        say: Callable[[str], None],
        signals: _Signals | None = None,
    ) -> None:
        self.opts = opts
        self.wf = wf
        self.say = say
        self.signals = signals or _Signals()
        self.health_urls: list[str] = list(opts.candidate_health)
        assert opts.traefik is not None
        self.traefik = Traefik(opts.traefik)
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
            self.health_urls = [f"{u.rstrip('/')}/api/healthz" for u in status]
        for url in self.health_urls:
            try:
                _in_flight_ages(url)
            except OSError as exc:
                raise RolloutRefused(
                    f"cannot read the candidate's requests in flight at {url} ({exc}); Traefik "
                    f"does not count a request until it ends, so the gate needs them. Pass "
                    f"--candidate-health URL of the candidate's /api/healthz (e.g. through its "
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


def _describe_plan(opts: Options, wf: WeightsFile) -> list[str]:
    g = opts.gate
    steps = opts.steps if opts.steps[-1] == 100 else [*opts.steps, 100]
    return [
        f"weights file   {wf.path} (weighted service {wf.service})",
        f"stable         {wf.stable}   candidate {wf.candidate}   now {wf.weights}",
        f"steps          candidate {' -> '.join(f'{s}%' for s in steps)}, hold "
        f"{_fmt_s(opts.hold_s)} each"
        + ("" if opts.steps[-1] == 100 else " (100% set at the end, without a hold)"),
        f"gate           5xx <= {g.max_error_rate:.1%}, p99 <= max({g.max_latency_ratio:g} x "
        f"stable, {_fmt_s(g.latency_floor_s)}), >= {g.min_requests} candidate requests per "
        f"hold, candidate UP in Traefik",
        "on breach      stable 100, candidate 0 at once; exit 1",
    ]


def _abort(wf: WeightsFile, lock: _DirLock, say: Callable[[str], None]) -> WeightsFile:
    """Write stable 100 now; keep it there until a rollout holding the lock has exited."""
    stable_100 = {wf.stable: 100, wf.candidate: 0}
    free = lock.try_acquire()
    after = wf.write(stable_100)
    if free:
        return after
    say(f"a rollout is running on {wf.path}: it stops at its next check (waiting for it)")
    deadline = time.monotonic() + ABORT_WAIT_S
    while True:
        gone = lock.try_acquire()
        # The rollout may have written a step between our read and our rename: write again.
        after = WeightsFile.load(
            wf.path, stable=wf.stable, candidate=wf.candidate, service=wf.service
        )
        if after.weights != stable_100:
            after = after.write(stable_100)
        if gone:
            return after
        if time.monotonic() >= deadline:
            say(
                f"the rollout still holds the lock after {ABORT_WAIT_S:g}s; "
                f"weights are {after.weights}"
            )
            return after
        time.sleep(0.1)


# -- command line -------------------------------------------------------------------------------
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
            f"--hold {args.hold}: expected {_fmt_s(MIN_HOLD_S)} to {MAX_HOLD_S / 60:.0f}m "
            f"(a shorter hold measures nothing, a longer one is a typo)"
        )
    if not MIN_INTERVAL_S <= interval <= hold:
        raise RolloutRefused(
            f"--interval {args.interval}: expected {_fmt_s(MIN_INTERVAL_S)} up to --hold"
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
    lock: _DirLock | None = None
    signals = _Signals()
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
        lock = _DirLock(wf.target.parent)
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
            after = _abort(wf, lock, say)
            report.result, report.weights_after = "aborted", after.weights
            say(f"aborted: {wf.path}: {wf.weights} -> {after.weights}")
            code = EXIT_PROMOTED
        elif args.dry_run:
            report.result, report.plan = "dry_run", _describe_plan(opts, wf)
            report.weights_after = wf.weights
            for line in report.plan:
                say(line)
            code = EXIT_PROMOTED
            if opts.traefik:
                _Rollout(opts, wf, say, signals).preflight()
                say("pre-flight     ok (nothing changed: dry run)")
        else:
            if not opts.traefik:
                raise RolloutRefused("--traefik URL is required (Traefik's internal entrypoint)")
            if not lock.try_acquire():
                raise RolloutRefused(
                    f"another rollout is running on {wf.path} (it holds the lock on "
                    f"{lock.directory}); wait for it, or stop it with --abort"
                )
            code, report, samples, started = _run_rollout(opts, wf, say, signals)
    except _Interrupted:
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


_Samples = list[tuple[float, dict[str, tuple[float, float]]]]


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
    samples: _Samples,
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


def _run_rollout(
    opts: Options, wf: WeightsFile, say: Callable[[str], None], signals: _Signals
) -> tuple[int, Report, _Samples, bool]:
    """Pre-flight and rollout: the exit code, the report, the metrics samples, and whether a
    first step's weights were written (an interrupt before that propagates: nothing changed)."""
    rollout = _Rollout(opts, wf, say, signals)
    rollout.preflight()
    for line in _describe_plan(opts, wf):
        say(line)
    try:
        code = rollout.run()
    except _Interrupted:
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


#: `(add_arguments, run)` for the `rollout` sub-command of `sf-lifecycle`.
COMMAND = (add_arguments, run)
