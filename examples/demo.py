"""Example 3: a gated blue/green upgrade through real Traefik, under load (`make demo`).

It follows the runbook in `infra/README.md` on this machine, with Traefik's file provider and the
blue/green routing of `infra/traefik/dynamic/` (stable pool, candidate pool, weighted service):

1. Traefik on 127.0.0.1 in front of `sf` (the example server, replica `sf-v1`), weights sf 100,
   sf-candidate 0.
2. A bounded mixed load: reads, slow reads, feedback writes, and SSE session streams (half of
   the clients keep the sticky cookie `sf-aff`).
3. The upgrade: start the new version (`sf-v2`) in the candidate pool on the same state volume;
   it takes no production traffic. Verify it through its own router (`/api/ready`,
   `/api/version`). Run `sf-lifecycle rollout --steps 10,50,100` (short holds), which gates each
   step on Traefik's metrics. Once promoted, SIGTERM `sf-v1`: it drains and exits.
4. A summary: requests sent and failed by status, feedback acknowledged vs delivered to the sink,
   SSE events published vs received (gaps, duplicates), the rollout's steps, and for each
   SIGTERM the time until the replica left Traefik's pool and until it exited.
5. The same as a picture: the upgrade report (`.demo/report.html`, see `sf_lifecycle.report`),
   with the requests per replica per 250 ms, the failures, the SIGTERM / out-of-pool / exit
   instants, the weights and the SSE reconnects on one timeline.

While it runs, the live page of the example server (its URL through Traefik is printed) follows
one of the demo's sessions in a browser, across the upgrade.

`--bad-candidate` (`make demo-rollback`) starts a candidate that answers 500 to part of
`/api/hello` (`SF_EXAMPLE_FAIL_RATE`): the rollout rolls back by itself and the summary counts the
errors users saw. `--baseline` runs the previous flow (candidate and `sf` in one pool, replaced
one after the other) with plain uvicorn replicas, for comparison. Everything started is stopped
at the end, also on Ctrl-C. The integration tests call `run()` with smaller figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from httpx_sse import connect_sse

from examples.demo_backends import Backends, parse_backends, started
from sf_lifecycle.report import SSE_RECONNECT, Instant, Requests, UpgradeTimeline, Weights
from sf_lifecycle.testing import BlueGreenProxy, ServerProcess, TraefikProxy, free_port, reap

ROOT = Path(__file__).resolve().parents[1]
#: Where `make demo` writes the upgrade report.
DEFAULT_REPORT = ROOT / ".demo" / "report.html"


@dataclass
class Options:
    """What the demo does; the defaults are what `make demo` runs."""

    baseline: bool = False
    rate: float = 100.0  # requests per second across the HTTP workers, before SSE
    #: HTTP worker threads; None: enough that slow reads (0.3 s, 1 in 10) still leave the rate.
    workers: int | None = None
    sse_clients: int = 4
    warmup_s: float = 3.0
    cooldown_s: float = 3.0
    drain_after_probes: int = 1
    state_dir: Path | None = None
    quiet: bool = False
    #: "rollout": the gated blue/green flow; "pool": candidate and sf in one pool (the flow
    #: before weighted routing, kept for the baseline and the upgrade benchmark).
    flow: str = "rollout"
    #: The candidate fails this share of /api/hello (SF_EXAMPLE_FAIL_RATE); 0: a good release.
    fail_rate: float = 0.0
    steps: str = "10,50,100"
    hold: str = "3s"
    #: Sticky clients stay on sf-v1 until its weight is 0, so at 10 % the candidate sees less
    #: than a tenth of the load: judge a 3 s hold on 10 requests.
    min_requests: int = 10
    #: Shared backends started for the run (`--backends postgres,redis`, see `demo_backends`):
    #: each replica then has a state directory of its own.
    backends: tuple[str, ...] = ()


@dataclass
class Stop:
    """One SIGTERM to a replica: when it left Traefik's pool and when it exited."""

    replica: str
    #: When the signal was sent, in seconds since the run began.
    at_s: float = 0.0
    to_pool_exit_s: float | None = None
    to_exit_s: float | None = None
    exit_code: int | None = None


@dataclass
class Summary:
    sent: int = 0
    load_s: float = 0.0
    failed: Counter[str] = field(default_factory=Counter)
    feedback_acked: set[str] = field(default_factory=set)
    feedback_delivered: list[str] = field(default_factory=list)
    events_published: dict[str, list[str]] = field(default_factory=dict)
    events_received: dict[str, list[str]] = field(default_factory=dict)
    stops: list[Stop] = field(default_factory=list)
    replicas_seen: Counter[str] = field(default_factory=Counter)
    sticky_repinned: int = 0
    leftover_pids: list[int] = field(default_factory=list)
    rollout_exit: int | None = None
    rollout_report: dict[str, Any] = field(default_factory=dict)
    verified: dict[str, str] = field(default_factory=dict)
    #: When each /api/hello 500 was answered, and by which replica (the bad candidate's errors).
    errors_seen: list[tuple[float, str | None]] = field(default_factory=list)
    #: Every process the run started (replicas and Traefik), to check none is left behind.
    pids: list[int] = field(default_factory=list)
    #: Time zero of the run (monotonic, and the same instant as a Unix time for the rollout's).
    t0: float = field(default_factory=time.monotonic)
    t0_unix: float = field(default_factory=time.time)
    #: Every request: (seconds since t0, replica that answered, "ok" or what failed).
    outcomes: list[tuple[float, str | None, str]] = field(default_factory=list)
    #: Every SSE stream opened again after its first: (seconds, replica, client).
    reconnects: list[tuple[float, str | None, str]] = field(default_factory=list)
    #: The live page through Traefik, following one of the demo's sessions.
    live_url: str = ""
    #: Where records and events went with `--backends`: summary rows.
    backend_rows: list[tuple[str, str]] = field(default_factory=list)
    #: Each replica's state directory.
    state_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def feedback_lost(self) -> set[str]:
        return self.feedback_acked - set(self.feedback_delivered)

    def feedback_duplicated(self) -> int:
        return len(self.feedback_delivered) - len(set(self.feedback_delivered))

    def sse_gaps_and_duplicates(self) -> tuple[int, int]:
        gaps = dups = 0
        for client, received in self.events_received.items():
            session = client.split("#", 1)[0]
            published = self.events_published.get(session, [])
            got = Counter(received)
            gaps += sum(1 for e in published if got[e] == 0)
            dups += sum(n - 1 for n in got.values() if n > 1)
        return gaps, dups


class _Start(Protocol):
    def __call__(
        self, replica: str, port: int, extra: dict[str, str] | None = None
    ) -> ServerProcess: ...


class _Say:
    def __init__(self, quiet: bool, t0: float) -> None:
        self.quiet = quiet
        self.t0 = t0

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:6.2f}s] {message}", flush=True)


class Load:
    """Bounded client traffic through the proxy, on threads, recording every outcome."""

    def __init__(self, base_url: str, opts: Options, summary: Summary) -> None:
        self.base_url = base_url
        self.opts = opts
        self.summary = summary
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.sessions = [f"demo-{i}" for i in range(max(1, opts.sse_clients // 2))]
        # A worker spends ~0.03 s per request on slow reads alone: about 10 req/s each.
        self.workers = opts.workers or max(4, math.ceil(opts.rate / 10))
        self.started = time.monotonic()
        self.elapsed_s = 0.0

    def start(self) -> None:
        for i in range(self.workers):
            self._spawn(self._worker, i, f"http-{i}")
        for i in range(self.opts.sse_clients):
            self._spawn(self._sse_client, i, f"sse-{i}")
        if self.opts.sse_clients:
            self._spawn(self._publisher, 0, "publisher")

    def _spawn(self, fn: Callable[[int], None], i: int, name: str) -> None:
        t = threading.Thread(target=fn, args=(i,), name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _record(self, status: int | str, replica: str | None = None) -> None:
        now = time.monotonic()
        with self.lock:
            self.summary.sent += 1
            ok = isinstance(status, int) and 200 <= status < 300
            what = "ok" if ok else f"HTTP {status}" if isinstance(status, int) else str(status)
            self.summary.outcomes.append((now - self.summary.t0, replica, what))
            if not ok:
                self.summary.failed[str(status)] += 1
                if status == 500:
                    self.summary.errors_seen.append((now, replica))
            if replica:
                self.summary.replicas_seen[replica] += 1

    def _worker(self, i: int) -> None:
        rng = random.Random(i)
        sticky = i % 2 == 0
        period = self.workers / self.opts.rate
        pinned: str | None = None
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                began = time.monotonic()
                if not sticky:
                    client.cookies.clear()
                roll = rng.random()
                try:
                    if roll < 0.2:
                        body = {"worker": i, "n": n, "text": "demo feedback " + "x" * 200}
                        r = client.post("/api/feedback", json=body)
                        if r.status_code == 202:
                            with self.lock:
                                self.summary.feedback_acked.add(r.json()["id"])
                    elif roll < 0.3:
                        r = client.get("/api/slow", params={"seconds": "0.3"})
                    else:
                        r = client.get("/api/hello")
                    replica = r.headers.get("x-sf-replica")
                    self._record(r.status_code, replica)
                    if sticky and replica and r.status_code < 300:
                        if pinned is not None and replica != pinned:
                            with self.lock:
                                self.summary.sticky_repinned += 1
                        pinned = replica
                except httpx.HTTPError as exc:
                    self._record(type(exc).__name__)
                n += 1
                self.stop.wait(max(0.0, period - (time.monotonic() - began)))

    def _publisher(self, _: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                session = self.sessions[n % len(self.sessions)]
                try:
                    r = client.post(
                        "/api/session/events", params={"session": session}, json={"n": n}
                    )
                    self._record(r.status_code, r.headers.get("x-sf-replica"))
                    if r.status_code < 300:
                        with self.lock:
                            self.summary.events_published.setdefault(session, []).append(
                                str(r.json()["id"])
                            )
                except httpx.HTTPError as exc:
                    self._record(type(exc).__name__)
                n += 1
                self.stop.wait(0.1)

    def _sse_client(self, i: int) -> None:
        session = self.sessions[i % len(self.sessions)]
        key = f"{session}#{i}"
        received = self.summary.events_received.setdefault(key, [])
        last_id: str | None = None
        sticky = i % 2 == 0
        opened = 0
        with httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(30, read=60)) as client:
            while not self.stop.is_set():
                if not sticky:
                    client.cookies.clear()
                headers = {"Last-Event-ID": last_id} if last_id else {}
                try:
                    with connect_sse(
                        client,
                        "GET",
                        "/api/session/events",
                        params={"session": session},
                        headers=headers,
                    ) as source:
                        if source.response.status_code != 200:
                            self._record(source.response.status_code)
                            self.stop.wait(0.2)
                            continue
                        replica = source.response.headers.get("x-sf-replica")
                        self._record(200, replica)
                        opened += 1
                        if opened > 1:
                            with self.lock:
                                self.summary.reconnects.append(
                                    (time.monotonic() - self.summary.t0, replica, key)
                                )
                        for event in source.iter_sse():
                            # A message with no data (the closing `retry:` hint) is not an
                            # event (the SSE spec says not to dispatch it); httpx-sse yields it
                            # anyway, carrying the previous id.
                            if not event.data:
                                continue
                            if event.id:
                                last_id = event.id
                                if event.event != "lost":
                                    received.append(event.id)
                            if self.stop.is_set():
                                break
                except httpx.HTTPError as exc:
                    if self.stop.is_set():
                        break
                    self._record(type(exc).__name__)
                    self.stop.wait(0.2)

    def caught_up(self) -> bool:
        """Every SSE client has received the last event published to its session."""
        with self.lock:
            for key, received in self.summary.events_received.items():
                published = self.summary.events_published.get(key.split("#", 1)[0])
                if published and (not received or received[-1] != published[-1]):
                    return False
        return True

    def finish(self, timeout: float = 10.0) -> None:
        """Let SSE clients catch up, then stop the HTTP workers and the publisher.

        SSE clients stop once their stream ends, which the replica's shutdown brings about:
        call `join_streams()` after stopping it.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.caught_up():
            time.sleep(0.1)
        self.stop.set()
        self.elapsed_s = time.monotonic() - self.started
        for t in self.threads:
            if not t.name.startswith("sse-"):
                t.join(timeout=35)

    def join_streams(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))


def _watch_stop(
    proxy: TraefikProxy,
    server: ServerProcess,
    name: str,
    summary: Summary,
    say: _Say,
    status: Callable[[], dict[str, str]] | None = None,
) -> Stop:
    """SIGTERM `server`; time until Traefik marks it DOWN and until the process exits."""
    status = status or proxy.server_status
    stop = Stop(name)
    summary.stops.append(stop)
    url = server.url
    server.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    stop.at_s = sent - summary.t0
    say(f"SIGTERM -> {name}")
    while server.proc is not None and server.proc.poll() is None:
        if stop.to_pool_exit_s is None:
            with contextlib.suppress(OSError, RuntimeError):
                if status().get(url) == "DOWN":
                    stop.to_pool_exit_s = time.monotonic() - sent
                    say(f"Traefik took {name} out of the pool")
        time.sleep(0.02)
    stop.to_exit_s = time.monotonic() - sent
    stop.exit_code = server.proc.returncode if server.proc is not None else None
    say(f"{name} exited with {stop.exit_code} after {stop.to_exit_s:.2f} s")
    return stop


def _delivered_ids(state_dir: Path) -> list[str]:
    """Every record id the default SQLite sink holds (one row per delivery)."""
    db = state_dir / "feedback.sqlite3"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM feedback")]


@contextlib.contextmanager
def _replicas(opts: Options, summary: Summary, backends: Backends) -> Iterator[_Start]:
    running: list[ServerProcess] = []

    def start(replica: str, port: int, extra: dict[str, str] | None = None) -> ServerProcess:
        assert opts.state_dir is not None
        env = {
            "SF_REPLICA_ID": replica,
            "SF_DRAIN_AFTER_PROBES": str(opts.drain_after_probes),
            "SF_DRAIN_DELAY_MS": "5000",
            **backends.env(),
            **(extra or {}),
        }
        # One volume per replica when nothing shared lives on disk; one shared volume else.
        state_dir = opts.state_dir / replica if backends.separate_volumes else opts.state_dir
        summary.state_dirs[replica] = state_dir
        server = ServerProcess(
            "examples.sf_server:app",
            state_dir=state_dir,
            env=env,
            port=port,
            cwd=ROOT,
            plain_uvicorn=opts.baseline,
        )
        running.append(server)
        server.start()
        summary.pids.append(server.pid)
        server.wait_ready(timeout=30)
        return server

    try:
        yield start
    finally:
        for server in running:
            server.close()


def _start_load(
    stack: contextlib.ExitStack, url: str, opts: Options, summary: Summary, say: _Say
) -> Load:
    """Start the mixed load through the proxy (stopped with `stack`), print the live page's
    URL, and let the load warm up."""
    load = Load(url, opts, summary)
    stack.callback(load.stop.set)
    load.start()
    say(f"load: {load.workers} HTTP workers at ~{opts.rate:g} req/s, {opts.sse_clients} SSE")
    summary.live_url = f"{url}/?session={load.sessions[0]}"
    say(f"live page (open it in a browser, watch it cross the upgrade): {summary.live_url}")
    time.sleep(opts.warmup_s)
    return load


def _backends(stack: contextlib.ExitStack, opts: Options, summary: Summary, say: _Say) -> Backends:
    """Start the shared backends `opts.backends` names (stopped with `stack`)."""
    if not opts.backends:
        return Backends()
    say(f"starting {', '.join(opts.backends)} for the replicas to share")
    backends = stack.enter_context(started(opts.backends))
    summary.pids += backends.pids
    say(f"backends: {backends.describe()}; one state directory per replica")
    return backends


def _delivered(summary: Summary, opts: Options, backends: Backends, load: Load) -> None:
    """Read what the sink holds, and with `--backends` say where records and events went."""
    assert opts.state_dir is not None
    if backends.database_url is None:
        summary.feedback_delivered = _delivered_ids(opts.state_dir)
    else:
        summary.feedback_delivered = backends.delivered_ids()
    if not opts.backends:
        return
    rows = [("backends", backends.describe())]
    if backends.database_url is not None:
        rows.append(
            (
                "records in PostgreSQL",
                f"{len(summary.feedback_delivered)} rows in sf_feedback "
                f"({len(set(summary.feedback_delivered))} distinct ids)",
            )
        )
    if backends.redis is not None:
        streams = backends.redis_events(load.sessions)
        rows.append(
            (
                "events via Redis",
                f"{sum(streams.values())} entries in {len(streams)} streams (sf:events:<session>)",
            )
        )
    elif backends.database_url is not None:
        rows.append(("events via PostgreSQL", f"{backends.postgres_events()} rows in sf_events"))
    left = sum(1 for d in set(summary.state_dirs.values()) for p in d.rglob("*") if p.is_file())
    rows.append(("files left on the replicas' volumes", str(left)))
    summary.backend_rows = rows


def run(opts: Options) -> Summary:
    """Run the whole upgrade flow and return what happened."""
    if opts.flow == "rollout" and not opts.baseline:
        return _run_rollout(opts)
    summary = Summary()
    say = _Say(opts.quiet, summary.t0)
    with contextlib.ExitStack() as stack:
        if opts.state_dir is None:
            opts.state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory("-sf-demo")))
        backends = _backends(stack, opts, summary, say)
        start = stack.enter_context(_replicas(opts, summary, backends))
        sf_port, candidate_port = free_port(), free_port()
        kind = "plain uvicorn" if opts.baseline else "sf-lifecycle serve"
        say(f"starting sf (sf-v1, {kind}) on :{sf_port}, state dir {opts.state_dir}")
        sf = start("sf-v1", sf_port)
        proxy = stack.enter_context(TraefikProxy([sf.url]))
        summary.pids.append(proxy.pid)
        say(f"Traefik {proxy.url} -> sf; health check every {proxy.routing.health_interval}")

        load = _start_load(stack, proxy.url, opts, summary, say)

        def join_pool(name: str, port: int, beside: ServerProcess) -> ServerProcess:
            """Start a replica, wait for /api/ready, add it to the pool, wait until it is UP."""
            server = start(name, port)
            proxy.set_backends([server.url, beside.url])
            proxy.wait_status({server.url: "UP"})
            say(f"{name} ready and UP in the pool")
            return server

        say("bringing up sf-candidate")
        candidate = join_pool("sf-candidate", candidate_port, sf)
        _watch_stop(proxy, sf, "sf-v1", summary, say)
        proxy.set_backends([candidate.url])  # a stopped container leaves Docker's discovery
        say("starting the new sf (sf-v2) on the same port and state volume")
        sf2 = join_pool("sf-v2", sf_port, candidate)
        say("retiring sf-candidate")
        _watch_stop(proxy, candidate, "sf-candidate", summary, say)
        proxy.set_backends([sf2.url])

        time.sleep(opts.cooldown_s)
        say("stopping the load; waiting for SSE clients to catch up")
        load.finish()
        summary.load_s = load.elapsed_s
        say("stopping sf-v2 (its queue drains on the way out)")
        _watch_stop(proxy, sf2, "sf-v2", summary, say)
        load.join_streams()
        _delivered(summary, opts, backends, load)
        for server in (sf, candidate, sf2):
            if server.proc is not None and server.proc.poll() is None:
                summary.leftover_pids.append(server.pid)
    return summary


def _run_rollout(opts: Options) -> Summary:
    """The blue/green flow: candidate verified, gated promotion, old version drained."""
    summary = Summary()
    say = _Say(opts.quiet, summary.t0)
    with contextlib.ExitStack() as stack:
        if opts.state_dir is None:
            opts.state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory("-sf-demo")))
        backends = _backends(stack, opts, summary, say)
        start = stack.enter_context(_replicas(opts, summary, backends))
        sf_port, candidate_port = free_port(), free_port()
        say(f"starting sf (sf-v1) on :{sf_port}, state dir {opts.state_dir}")
        sf = start("sf-v1", sf_port)
        proxy = stack.enter_context(BlueGreenProxy(sf.url, f"http://127.0.0.1:{candidate_port}"))
        summary.pids.append(proxy.pid)
        say(f"Traefik {proxy.url} -> sf-weighted {proxy.file_weights()}, API :{proxy.api_port}")

        load = _start_load(stack, proxy.url, opts, summary, say)

        bad = f", SF_EXAMPLE_FAIL_RATE={opts.fail_rate:g}" if opts.fail_rate else ""
        say(f"starting the new version (sf-v2{bad}) in the candidate pool, weight 0")
        cand = start("sf-v2", candidate_port, {"SF_EXAMPLE_FAIL_RATE": str(opts.fail_rate)})
        proxy.wait_until(
            lambda: set(proxy.candidate_status().values()) == {"UP"}, 10, "candidate UP in Traefik"
        )
        # The verification router has a service (and a health check) of its own.
        proxy.wait_until(
            lambda: set(proxy.verify_status().values()) == {"UP"}, 10, "verify service UP"
        )
        for path in ("/api/ready", "/api/version"):
            code, _, body = proxy.candidate_request(path)
            summary.verified[path] = f"{code} {body.decode()[:60]}"
        say(f"verified through the candidate router: {summary.verified}")

        report = _rollout(proxy, opts, cand, summary, say)
        summary.rollout_report = report
        if summary.rollout_exit == 0:
            say("promoted; retiring sf-v1 with SIGTERM (it drains its queue on the way out)")
            _watch_stop(proxy, sf, "sf-v1", summary, say)
            live, live_name, live_status = cand, "sf-v2", proxy.candidate_status
        else:
            say("rolled back; retiring the bad candidate sf-v2 with SIGTERM")
            _watch_stop(proxy, cand, "sf-v2", summary, say, proxy.candidate_status)
            live, live_name, live_status = sf, "sf-v1", proxy.server_status

        time.sleep(opts.cooldown_s)
        say("stopping the load; waiting for SSE clients to catch up")
        load.finish()
        summary.load_s = load.elapsed_s
        say(f"stopping {live_name} (its queue drains on the way out)")
        _watch_stop(proxy, live, live_name, summary, say, live_status)
        load.join_streams()
        _delivered(summary, opts, backends, load)
        for server in (sf, cand):
            if server.proc is not None and server.proc.poll() is None:
                summary.leftover_pids.append(server.pid)
    return summary


def _rollout(
    proxy: BlueGreenProxy, opts: Options, cand: ServerProcess, summary: Summary, say: _Say
) -> dict[str, Any]:
    """`sf-lifecycle rollout` as an operator runs it; its progress lines are shown as they come."""
    cmd = [
        sys.executable,
        "-m",
        "sf_lifecycle",
        "rollout",
        *("--weights", str(proxy.weights_path), "--traefik", proxy.api_url),
        *("--steps", opts.steps, "--hold", opts.hold, "--interval", "250ms"),
        *("--min-requests", str(opts.min_requests)),
        *("--candidate-ready", f"{cand.url}/api/ready", "--json"),
    ]
    say("$ sf-lifecycle " + " ".join(cmd[3:-1]))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    summary.pids.append(proc.pid)
    try:
        assert proc.stderr is not None
        assert proc.stdout is not None
        for line in proc.stderr:
            say(f"  rollout | {line.rstrip()}")
        out = proc.stdout.read()
        summary.rollout_exit = proc.wait(30)
    finally:
        reap(proc, 5)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    try:
        report: dict[str, Any] = json.loads(out)
    except ValueError:
        report = {"result": "no report", "output": out}
    return report


def _side(side: dict[str, Any]) -> str:
    p99 = side.get("p99_s")
    shown = "-" if p99 is None else f"{p99 * 1000:.0f} ms"
    return f"{side['requests']} req, {side['errors']} 5xx, p99 {shown}"


def _rollout_rows(summary: Summary) -> list[tuple[str, str]]:
    report = summary.rollout_report
    if not report:
        return []
    rows = [
        (
            "candidate verified",
            ", ".join(f"{k} {v.split()[0]}" for k, v in summary.verified.items()),
        )
    ]
    steps = report.get("steps") or []
    for step in steps:
        rows.append(
            (
                f"  step {step['weight']}%",
                f"{step['verdict']} after {step['held_s']:.1f} s | sf-v1 {_side(step['stable'])}"
                f" | sf-v2 {_side(step['candidate'])}",
            )
        )
    result = report.get("result", "?")
    rows.insert(1, ("rollout", f"{result} (exit {summary.rollout_exit})"))
    if report.get("reason"):
        rows.append(("  why", str(report["reason"])))
    if result == "rolled_back":
        by = Counter(r for _, r in summary.errors_seen)
        rows.append(
            (
                "errors users saw",
                f"{len(summary.errors_seen)} (HTTP 500: "
                + ", ".join(f"{r}: {n}" for r, n in sorted(by.items(), key=str))
                + ")",
            )
        )
    return rows


def verdict(summary: Summary, opts: Options) -> tuple[bool, str]:
    """Whether the run did what it shows, and the line that says so."""
    clean = (
        not summary.feedback_lost()
        and summary.feedback_duplicated() == 0
        and summary.sse_gaps_and_duplicates() == (0, 0)
    )
    if opts.flow == "rollout" and opts.fail_rate:
        only_candidate = set(summary.failed) <= {"500"} and all(
            r == "sf-v2" for _, r in summary.errors_seen
        )
        ok = clean and summary.rollout_exit == 1 and only_candidate
        return ok, "automatic rollback: " + ("OK" if ok else "FAILED")
    ok = clean and summary.failed_total == 0
    if opts.flow == "rollout":
        ok = ok and summary.rollout_exit == 0
        return ok, "gated blue/green upgrade: " + ("OK" if ok else "FAILED")
    return ok, "zero-downtime upgrade: " + ("OK" if ok else "FAILED")


def summary_rows(summary: Summary, opts: Options) -> list[tuple[str, str]]:
    """The summary as (label, value) rows: printed by `render`, tabled in the report."""
    gaps, dups = summary.sse_gaps_and_duplicates()
    published = sum(len(v) for v in summary.events_published.values())
    received = sum(len(v) for v in summary.events_received.values())
    rows = [
        ("runner", "plain uvicorn (baseline)" if opts.baseline else "sf-lifecycle serve"),
        (
            "requests sent",
            f"{summary.sent} in {summary.load_s:.1f} s"
            + (f" ({summary.sent / summary.load_s:.0f} req/s)" if summary.load_s else ""),
        ),
        (
            "requests failed",
            f"{summary.failed_total}"
            + (
                f"  ({', '.join(f'{k}: {v}' for k, v in sorted(summary.failed.items()))})"
                if summary.failed
                else ""
            ),
        ),
        ("feedback acknowledged", str(len(summary.feedback_acked))),
        (
            "feedback delivered",
            f"{len(set(summary.feedback_delivered))}  (lost {len(summary.feedback_lost())}, "
            f"duplicated {summary.feedback_duplicated()})",
        ),
        ("SSE events published", str(published)),
        ("SSE events received", f"{received}  (gaps {gaps}, duplicates {dups})"),
        ("SSE reconnects", _reconnects(summary)),
        ("sticky clients re-pinned", str(summary.sticky_repinned)),
        *summary.backend_rows,
        *_rollout_rows(summary),
        ("answered by", ", ".join(f"{k}: {v}" for k, v in sorted(summary.replicas_seen.items()))),
    ]
    for stop in summary.stops:
        pool = "never" if stop.to_pool_exit_s is None else f"{stop.to_pool_exit_s:.2f} s"
        rows.append(
            (
                f"SIGTERM {stop.replica}",
                f"out of pool {pool}, exited {stop.to_exit_s or 0:.2f} s (code {stop.exit_code})",
            )
        )
    return rows


def _reconnects(summary: Summary) -> str:
    to = Counter(replica or "?" for _, replica, _ in summary.reconnects)
    return f"{len(summary.reconnects)}" + (
        f"  (to {', '.join(f'{k}: {v}' for k, v in sorted(to.items()))})" if to else ""
    )


def render(summary: Summary, opts: Options) -> str:
    rows = summary_rows(summary, opts)
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 60)
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])


def timeline(summary: Summary, opts: Options) -> UpgradeTimeline:
    """The run as the upgrade report draws it (`sf_lifecycle.report`)."""
    ok, line = verdict(summary, opts)
    if opts.baseline:
        title = "sf-lifecycle demo: plain uvicorn upgrade (baseline)"
        line, ok = f"baseline: {summary.failed_total} requests failed", summary.failed_total == 0
    elif opts.fail_rate:
        title = "sf-lifecycle demo: a bad release, rolled back by the gate"
    elif opts.flow == "rollout":
        title = "sf-lifecycle demo: gated blue/green upgrade"
    else:
        title = "sf-lifecycle demo: zero-downtime upgrade"
    tl = UpgradeTimeline(title, summary.t0_unix, verdict=line, ok=ok)
    for t, replica, what in summary.outcomes:
        failed = what != "ok"
        tl.requests.append(Requests(t, replica or "", 1, int(failed), what if failed else ""))
    for stop in summary.stops:
        tl.instants.append(Instant(stop.at_s, stop.replica, "SIGTERM"))
        if stop.to_pool_exit_s is not None:
            tl.instants.append(
                Instant(stop.at_s + stop.to_pool_exit_s, stop.replica, "out of pool")
            )
        if stop.to_exit_s is not None:
            code = f"code {stop.exit_code}"
            tl.instants.append(Instant(stop.at_s + stop.to_exit_s, stop.replica, "exit", code))
    for t, replica, client in summary.reconnects:
        tl.instants.append(Instant(t, replica or "", SSE_RECONNECT, client))
    for w in summary.rollout_report.get("weights_timeline") or []:
        at = float(w["t"]) - summary.t0_unix
        tl.weights.append(Weights(at, dict(w["weights"]), str(w.get("note", ""))))
    if tl.weights:
        # Before the rollout, Traefik served the weights it started with.
        tl.weights.insert(0, Weights(0.0, tl.weights[0].weights, "Traefik started"))
        tl.pools = {"sf": "sf-v1", "sf-candidate": "sf-v2"}
    tl.summary = summary_rows(summary, opts)
    return tl


def write_report(summary: Summary, opts: Options, path: Path) -> Path:
    """Write the run's upgrade report to `path` (needs the `report` extra: plotly)."""
    from sf_lifecycle.report import write_report as write

    return write(timeline(summary, opts), path)


def _backends_arg(raw: str) -> tuple[str, ...]:
    try:
        return parse_backends(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--baseline", action="store_true", help="plain uvicorn replicas instead")
    p.add_argument("--rate", type=float, default=100.0, help="HTTP requests/s (default 100)")
    p.add_argument("--sse-clients", type=int, default=4)
    p.add_argument("--state-dir", type=Path, default=None, help="keep the state here")
    p.add_argument(
        "--bad-candidate",
        nargs="?",
        type=float,
        const=0.3,
        default=0.0,
        metavar="RATE",
        help="the candidate fails this share of /api/hello (default 0.3): watch the rollback",
    )
    p.add_argument("--hold", default="3s", help="rollout hold per step (default 3s)")
    p.add_argument(
        "--report",
        type=Path,
        default=DEFAULT_REPORT,
        metavar="FILE",
        help=f"write the upgrade report here (default {DEFAULT_REPORT.relative_to(ROOT)})",
    )
    p.add_argument("--no-report", action="store_true", help="print the summary only")
    p.add_argument(
        "--backends",
        type=_backends_arg,
        default=(),
        metavar="NAMES",
        help="shared backends to start for the replicas: postgres, redis or postgres,redis "
        "(make demo BACKENDS=postgres,redis); each replica then has its own state directory",
    )
    args = p.parse_args(argv)
    opts = Options(
        baseline=args.baseline,
        rate=args.rate,
        sse_clients=args.sse_clients,
        state_dir=args.state_dir,
        flow="pool" if args.baseline else "rollout",
        fail_rate=args.bad_candidate,
        hold=args.hold,
        backends=args.backends,
    )
    if not args.no_report:
        from sf_lifecycle.report import report_path_problem

        # Before the run, not after it: a typo must not cost a whole demo.
        problem = report_path_problem(args.report)
        if problem:
            print(f"demo: --report {args.report}: {problem}", file=sys.stderr)
            return 2
    try:
        summary = run(opts)
    except KeyboardInterrupt:
        print("\ninterrupted: every process the demo started has been stopped", file=sys.stderr)
        return 130
    print(render(summary, opts))
    if not args.no_report:
        _print_report(summary, opts, args.report)
    if opts.baseline:
        print("baseline run: failures above are what a plain uvicorn upgrade costs")
        return 0
    ok, line = verdict(summary, opts)
    print(line)
    return 0 if ok else 1


def _print_report(summary: Summary, opts: Options, path: Path) -> None:
    from sf_lifecycle.report import ReportUnavailable

    try:
        written = write_report(summary, opts, path)
    except (ReportUnavailable, OSError) as exc:
        print(f"report not written: {exc}")
        return
    size = written.stat().st_size / 1e6
    print(f"report: {written.resolve()} ({size:.1f} MB; opens offline in any browser)")


if __name__ == "__main__":
    raise SystemExit(main())
