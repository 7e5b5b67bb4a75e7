"""Shared machinery of the campaign: the oracle, concurrent posters, the random-kill loop.

The oracle, on top of the library's `sf_lifecycle.testing.oracle.check_delivery`:
every record acknowledged with 2xx is in the sink exactly once, under the id it was acknowledged
with; no record that was never sent is there; no `.log` / `.draining` file is left after a clean
stop; quarantine is empty (nothing here damages files on purpose).

Every request carries a unique `nonce`, so "exactly once" is checked on what the client sent, not
only on ids (two deliveries of one request under two ids would pass an id check).
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import importlib
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sf_lifecycle.testing import ServerProcess
from sf_lifecycle.testing.oracle import DeliveryReport, check_delivery

ROOT = Path(__file__).resolve().parents[2]
JSON = {"content-type": "application/json"}
#: Settings of every campaign server: no drain delay (no proxy to tell), a fast drainer.
BASE_ENV = {"SF_DRAIN_DELAY_MS": "0", "SF_DRAIN_INTERVAL_MS": "30", "SF_DRAIN_BATCH_RECORDS": "8"}


def sink_rows(state: Path, database_url: str | None = None) -> list[tuple[str, str]]:
    """(id, body) of every record in `<state>/feedback.sqlite3`, or in PostgreSQL's
    `sf_feedback` when `database_url` is given (empty when not created yet)."""
    if database_url is not None:
        import psycopg

        try:
            with psycopg.connect(database_url, connect_timeout=5) as pg:
                return [(r[0], r[1]) for r in pg.execute("SELECT id, body::text FROM sf_feedback")]
        except psycopg.errors.UndefinedTable:
            return []
    db = state / "feedback.sqlite3"
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=10)
    try:
        return [(r[0], r[1]) for r in conn.execute("SELECT id, body FROM feedback")]
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return []
    finally:
        conn.close()


def leftovers(state: Path) -> dict[str, list[str]]:
    """Segment files and quarantined files still on disk."""
    fdir = state / "feedback"
    names = sorted(p.name for p in fdir.iterdir()) if fdir.exists() else []
    quarantine = fdir / "quarantine"
    return {
        "log": [n for n in names if n.endswith(".log")],
        "draining": [n for n in names if n.endswith(".draining")],
        "quarantine": sorted(p.name for p in quarantine.iterdir()) if quarantine.exists() else [],
    }


@dataclass
class Verdict:
    """What the oracle found; `ok` when nothing was lost, duplicated, invented or left over."""

    acked: int
    sent: int
    in_sink: int
    lost: list[str]
    duplicated: list[str]
    unknown: list[str]
    wrong_id: list[str]
    left: dict[str, list[str]]
    #: The library's id-level oracle (`sf_lifecycle.testing.oracle`) on the same state.
    report: DeliveryReport

    @property
    def ok(self) -> bool:
        return self.report.ok and not (
            self.lost or self.duplicated or self.unknown or self.wrong_id or any(self.left.values())
        )


@dataclass
class Oracle:
    """The client's view: nonces sent, and the id each acknowledged one got."""

    acked: dict[str, str] = field(default_factory=dict)
    sent: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    def nonce(self, tag: str = "n") -> str:
        with self._lock:
            n = f"{tag}{next(self._counter)}"
            self.sent.add(n)
            return n

    def ack(self, nonce: str, rid: str) -> None:
        with self._lock:
            self.acked[nonce] = rid

    def check(self, state: Path, database_url: str | None = None) -> Verdict:
        rows = sink_rows(state, database_url)
        by_nonce: dict[str, list[str]] = {}
        for rid, body in rows:
            nonce = json.loads(body).get("nonce", "?")
            by_nonce.setdefault(nonce, []).append(rid)
        counts = Counter({k: len(v) for k, v in by_nonce.items()})
        return Verdict(
            acked=len(self.acked),
            sent=len(self.sent),
            in_sink=len(rows),
            lost=sorted(n for n in self.acked if n not in by_nonce),
            duplicated=sorted(n for n, c in counts.items() if c > 1),
            unknown=sorted(n for n in by_nonce if n not in self.sent),
            wrong_id=sorted(
                n for n, rid in self.acked.items() if n in by_nonce and by_nonce[n][0] != rid
            ),
            left=leftovers(state),
            report=check_delivery(
                self.acked.values(),
                state_dir=state,
                delivered=None if database_url is None else [rid for rid, _ in rows],
                unacknowledged=len(self.sent) - len(self.acked),
            ),
        )


def post_one(server: ServerProcess, oracle: Oracle, tag: str = "n", timeout: float = 5.0) -> int:
    """POST one record; 2xx is recorded as acknowledged. Returns the status, 0 when cut off."""
    nonce = oracle.nonce(tag)
    body = json.dumps({"nonce": nonce, "pad": "x" * 64}).encode()
    try:
        status, _, data = server.get(
            "/api/feedback", method="POST", body=body, headers=JSON, timeout=timeout
        )
    except (OSError, http.client.HTTPException):
        return 0  # refused, reset or cut by a kill: outcome unknown, never acknowledged
    if 200 <= status < 300:
        oracle.ack(nonce, json.loads(data)["id"])
    return status


class Posters:
    """`n` threads posting records in a loop to whichever server `target` holds."""

    def __init__(self, oracle: Oracle, target: list[ServerProcess], n: int = 4) -> None:
        self.oracle = oracle
        self.target = target
        self.stop_event = threading.Event()
        self.statuses: Counter[int] = Counter()
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(n)
        ]

    def _run(self, k: int) -> None:
        while not self.stop_event.is_set():
            if not self.target:
                time.sleep(0.005)
                continue
            status = post_one(self.target[-1], self.oracle, f"t{k}-", timeout=3.0)
            with self._lock:
                self.statuses[status] += 1
            if status == 0:
                time.sleep(0.005)  # refused: the next server is not listening yet

    def __enter__(self) -> Posters:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(10)


def start_server(state: Path, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(state_dir=state, env={**BASE_ENV, **(env or {})}, cwd=ROOT).start()


def clean_restart(state: Path, timeout: float = 30.0, env: dict[str, str] | None = None) -> str:
    """Start on `state`, wait until recovery is done (ready), stop with SIGTERM (exit 0)."""
    server = start_server(state, env)
    try:
        server.wait_ready(timeout)
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout)
        logs = server.logs()
        if code != 0:
            raise AssertionError(f"clean restart exited {code}:\n{logs}")
        return logs
    finally:
        server.close()


@dataclass
class KillStats:
    iterations: int = 0
    blue_green: int = 0
    killed_running: int = 0
    killed_draining: int = 0
    killed_starting: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    pids: list[int] = field(default_factory=list)

    def leftover_pids(self) -> list[int]:
        """Started servers still running (each is reaped by PID; none may survive the loop)."""
        alive = []
        for pid in self.pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            alive.append(pid)
        return alive


def _kill_at_random(server: ServerProcess, rng: random.Random, stats: KillStats) -> None:
    """SIGKILL now, or SIGTERM first and SIGKILL at a random instant of the shutdown drain."""
    if rng.random() < 0.4:
        server.send_signal(signal.SIGTERM)
        time.sleep(rng.uniform(0, 0.15))
        stats.killed_draining += 1
    else:
        stats.killed_running += 1
    server.kill()


def random_kill_campaign(
    state: Path,
    iterations: int,
    *,
    seed: int = 0,
    blue_green_every: int = 5,
    posters: int = 4,
    database_url: str | None = None,
) -> tuple[KillStats, Verdict]:
    """The random-SIGKILL loop (`test_random_kill.py`): kill a loaded server at a random
    instant, restart on the same state.

    With `database_url` the servers drain to PostgreSQL (`SF_DATABASE_URL`: the PostgreSQL sink
    and idempotency index) and the oracle reads the table there.

    Every `blue_green_every`-th iteration is blue/green: the old server gets SIGTERM and drains
    with a slow sink while a new one starts on the same state dir, recovers and takes the load;
    the old one is killed at a random point of its drain (or finishes it).
    """
    rng = random.Random(seed)
    db_env = {} if database_url is None else {"SF_DATABASE_URL": database_url}
    oracle = Oracle()
    stats = KillStats()
    began = time.monotonic()
    target: list[ServerProcess] = []
    try:
        with Posters(oracle, target, posters) as load:
            for i in range(iterations):
                blue_green = blue_green_every > 0 and i % blue_green_every == blue_green_every - 1
                slow = {"SF_EXAMPLE_SINK_DELAY_MS": "20"} if blue_green else {}
                server = start_server(state, {**db_env, **slow})
                stats.pids.append(server.pid)
                target.append(server)
                try:
                    if not blue_green and rng.random() < 0.15:
                        time.sleep(rng.uniform(0, 0.25))  # killed while starting / recovering
                        stats.killed_starting += 1
                        server.kill()
                    else:
                        server.wait_ready(30)
                        time.sleep(rng.uniform(0, 0.3))
                        if blue_green:
                            stats.blue_green += 1
                            _blue_green(state, server, target, rng, db_env)
                            stats.pids.append(target[-1].pid)
                        else:
                            _kill_at_random(server, rng, stats)
                finally:
                    for s in target:
                        s.close()
                    del target[:-1]
                stats.iterations += 1
            stats.statuses = load.statuses
    finally:
        for s in target:
            s.close()
    clean_restart(state, env=db_env)
    stats.elapsed_s = time.monotonic() - began
    return stats, oracle.check(state, database_url)


def _blue_green(
    state: Path,
    blue: ServerProcess,
    target: list[ServerProcess],
    rng: random.Random,
    env: dict[str, str],
) -> None:
    blue.send_signal(signal.SIGTERM)  # blue drains what it holds ...
    green = start_server(
        state, {**env, "SF_EXAMPLE_SINK_DELAY_MS": "20"}
    )  # ... while green recovers
    target.append(green)
    green.wait_ready(30)
    time.sleep(rng.uniform(0, 0.2))
    if rng.random() < 0.5:
        blue.kill()  # killed mid-drain: green, or the next start, recovers its files
    else:
        with contextlib.suppress(Exception):
            blue.wait(30)
    time.sleep(rng.uniform(0, 0.2))
    green.kill()


def example_create_app() -> Any:
    """`examples.sf_server.create_app`, importing the module without an `SF_STATE_DIR` around.

    The module builds its own `app` at import (for `sf-lifecycle serve`), which needs a state
    dir: it gets a throw-away one, removed at exit.
    """
    if "examples.sf_server" not in sys.modules:
        tmp = tempfile.mkdtemp(prefix="sf-example-import-")
        atexit.register(shutil.rmtree, tmp, True)
        old = os.environ.get("SF_STATE_DIR")
        os.environ["SF_STATE_DIR"] = tmp
        try:
            importlib.import_module("examples.sf_server")
        finally:
            if old is None:
                del os.environ["SF_STATE_DIR"]
            else:
                os.environ["SF_STATE_DIR"] = old
    return sys.modules["examples.sf_server"].create_app
