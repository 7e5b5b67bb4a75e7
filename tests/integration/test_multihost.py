"""Many hosts on one machine: replicas that share no file, behind real Traefik, on PostgreSQL and
Redis.

Each replica of the example server runs under `sf-lifecycle serve` with a state directory of its
own (a pod's ReadWriteOnce volume): it holds only that replica's write-ahead queue. What replicas
share goes through one real PostgreSQL (`sf_postgres`: the sink, the Idempotency-Key index) and
one real Redis (`sf_redis`: the session events). Traefik (file provider) routes with the sticky
cookie of `infra/` (`sf-aff`) and a short health interval, so the drains are quick.

The run (one module fixture; the tests below each check one thing it must show):

1. Replicas r1, r2, r3 start, each on its own state directory; Traefik in front of them.
   r2's drainer is behind (no background drain, slow sink batches): a host whose volume holds
   a backlog when it goes.
2. Load through Traefik: two feedback writers (one keeps its cookie, one drops it), a
   publisher on two sessions, and SSE clients: sticky ones (pinned on r1, r2 and r3) and
   hopping ones that drop their cookie and reconnect with `Last-Event-ID` every few events.
   Every third write carries an `Idempotency-Key`; once acknowledged, the writer retries it
   directly on another replica's port.
3. The upgrade: r4 starts on a new state directory and joins the pool; r1 gets SIGTERM, leaves
   the pool, drains and exits 0.
4. r2 gets SIGTERM and is SIGKILLed while its final drain is under way (a `.draining` file on
   its volume, part of its records not in PostgreSQL yet). It is restarted on its own state
   directory (new port), recovers the file, and rejoins the pool.
5. The load stops; the SSE clients catch up; r2, r3, r4 get SIGTERM and exit 0.

Every process is reaped by PID in a `finally`, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
from httpx_sse import connect_sse

from sf_lifecycle import ExitCode
from sf_lifecycle.testing import (
    PostgresServer,
    RedisServer,
    ServerProcess,
    TraefikProxy,
    TraefikRouting,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EVENTS = "/api/session/events"
#: The routing of `infra/` (health path, sticky cookie `sf-aff`) with a faster health check.
ROUTING = TraefikRouting(health_interval="200ms", health_timeout="150ms")
#: The drain delay ends 500 ms after Traefik's first 503 probe (SF_DRAIN_AFTER_PROBES).
ENV = {
    "SF_DRAIN_DELAY_MS": "3000",
    "SF_DRAIN_AFTER_PROBES": "1",
    "SF_DRAIN_INTERVAL_MS": "200",
    "SF_SSE_RETRY_MS": "200",
}
#: r2 at first: no background drain, 600 ms per sink batch of 4 records.
BEHIND = {
    "SF_DRAIN_INTERVAL_MS": "3600000",
    "SF_EXAMPLE_SINK_DELAY_MS": "600",
    "SF_DRAIN_BATCH_RECORDS": "4",
}
HOP_EVERY = 4  # a hopping SSE client drops its cookie and reconnects after this many events


def _segments(state: Path) -> list[str]:
    folder = state / "feedback"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".log", ".draining")))


@dataclass
class Cluster:
    """The replicas by name, Traefik, and which replicas a client may still target directly."""

    root: Path
    env: dict[str, str]
    proxy: TraefikProxy | None = None
    replicas: dict[str, ServerProcess] = field(default_factory=dict)
    every: list[ServerProcess] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, name: str, extra: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(
            state_dir=self.root / name,
            env={**self.env, "SF_REPLICA_ID": name, **(extra or {})},
            cwd=ROOT,
        )
        self.every.append(server)
        self.replicas[name] = server
        server.start()
        return server

    def pool(self, names: list[str]) -> None:
        assert self.proxy is not None
        self.proxy.set_backends([self.replicas[n].url for n in names])

    def join(self, name: str) -> None:
        """Add a ready replica to Traefik's pool; return once Traefik routes to it."""
        assert self.proxy is not None
        with self.lock:
            names = [*self.live, name]
        self.pool(names)
        self.proxy.wait_status({self.replicas[name].url: "UP"})
        with self.lock:
            self.live.append(name)

    def leave(self, name: str) -> ServerProcess:
        """No client targets `name` directly any more (its SIGTERM follows)."""
        with self.lock:
            self.live.remove(name)
        return self.replicas[name]

    def other_than(self, name: str | None, attempt: int) -> ServerProcess:
        with self.lock:
            names = [n for n in self.live if n != name] or list(self.live)
        return self.replicas[names[attempt % len(names)]]


@dataclass
class Replay:
    """One Idempotency-Key retried on another replica's port."""

    key: str
    first_id: str
    first_replica: str
    replica: str = ""
    status: int = 0
    id: str = ""
    replayed: str | None = None
    in_flight: int = 0  # 409 answers before the replay (the first replica's settle is async)


@dataclass
class Client:
    """One SSE client: what it received and which replica served each of its streams."""

    name: str
    session: str
    sticky: bool
    received: list[str] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)
    opened: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)


@dataclass
class Traffic:
    """Bounded load through Traefik, on threads, recording every outcome."""

    url: str
    cluster: Cluster
    sessions: list[str]
    stop: threading.Event = field(default_factory=threading.Event)
    stop_streams: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, str] = field(default_factory=dict)  # record id -> replica that acked it
    failures: list[str] = field(default_factory=list)
    replays: list[Replay] = field(default_factory=list)
    published: dict[str, list[str]] = field(default_factory=dict)
    clients: list[Client] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    writes: int = 0

    def spawn(self, target: Callable[..., None], *args: object) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)
        return t

    def sse_client(self, client: Client) -> None:
        last: str | None = None
        with httpx.Client(base_url=self.url, timeout=httpx.Timeout(10, read=30)) as http:
            while not self.stop_streams.is_set():
                if not client.sticky:
                    http.cookies.clear()
                headers = {"Last-Event-ID": last} if last else {}
                try:
                    with connect_sse(
                        http, "GET", EVENTS, params={"session": client.session}, headers=headers
                    ) as source:
                        if source.response.status_code != 200:
                            client.errors.append(f"HTTP {source.response.status_code}")
                            time.sleep(0.1)
                            continue
                        client.streams.append(source.response.headers["x-sf-replica"])
                        client.opened.set()
                        got = 0
                        for sse in source.iter_sse():
                            if not sse.data:  # the closing `retry:` hint
                                continue
                            last = sse.id
                            client.received.append(sse.id)
                            got += 1
                            if not client.sticky and got >= HOP_EVERY:
                                break  # drop the cookie, reconnect through Traefik
                except httpx.HTTPError as exc:
                    if not self.stop_streams.is_set():
                        client.errors.append(type(exc).__name__)
                        time.sleep(0.1)

    def publisher(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            n = 0
            while not self.stop.is_set():
                session = self.sessions[n % len(self.sessions)]
                try:
                    r = http.post(EVENTS, params={"session": session}, json={"n": n})
                    if r.status_code == 201:
                        self.published.setdefault(session, []).append(str(r.json()["id"]))
                    else:
                        self.failures.append(f"publish: HTTP {r.status_code} {r.text[:100]}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"publish: {exc!r}")
                n += 1
                self.stop.wait(0.05)

    def writer(self, worker: int, sticky: bool) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            n = 0
            while not self.stop.is_set():
                if not sticky:
                    http.cookies.clear()
                key = f"mh-{worker}-{n}-{uuid.uuid4().hex[:6]}" if n % 3 == 0 else None
                headers = {"idempotency-key": key} if key else {}
                body = {"worker": worker, "n": n}
                try:
                    r = http.post("/api/feedback", json=body, headers=headers)
                except httpx.HTTPError as exc:
                    self.failures.append(f"feedback: {exc!r}")
                    self.stop.wait(0.1)
                    continue
                finally:
                    n += 1
                if r.status_code != 202:
                    self.failures.append(f"feedback: HTTP {r.status_code} {r.text[:100]}")
                    continue
                rid, replica = r.json()["id"], r.headers["x-sf-replica"]
                with self.lock:
                    self.acked[rid] = replica
                    self.writes += 1
                if key:
                    self.replays.append(self.retry_elsewhere(key, rid, replica, body))
                self.stop.wait(0.05)

    def retry_elsewhere(self, key: str, rid: str, replica: str, body: object) -> Replay:
        """The same keyed write, sent straight to another replica's port (as a client whose
        connection broke retries, landing on another host)."""
        replay = Replay(key, rid, replica)
        data = json.dumps(body).encode()
        headers = {"content-type": "application/json", "idempotency-key": key}
        for attempt in range(60):
            target = self.cluster.other_than(replica, attempt)
            try:
                status, h, raw = target.get(
                    "/api/feedback", method="POST", body=data, headers=headers
                )
            except OSError:
                continue  # it left between the pick and the send: another one
            if status == 409:
                replay.in_flight += 1
                time.sleep(0.05)
                continue
            replay.replica, replay.status = target.env["SF_REPLICA_ID"], status
            replay.id = json.loads(raw).get("id", "")
            replay.replayed = h.get("idempotent-replayed")
            break
        return replay

    def caught_up(self) -> bool:
        return all(c.received[-1:] == self.published.get(c.session, [])[-1:] for c in self.clients)


@dataclass
class Run:
    """What the scenario observed."""

    state_dirs: dict[str, Path]
    traffic: Traffic
    exits: dict[str, int]
    killed_with_draining: list[str]
    killed_missing: int
    stored: list[str]
    open_files: dict[str, list[str]]
    leftovers: dict[str, list[str]]
    pids: list[int]
    seconds: float


def stored_ids(url: str) -> list[str]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM sf_feedback").fetchall()]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.02)


def open_files(pid: int, under: Path) -> list[str]:
    """Paths under `under` that process `pid` holds open."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(str(under)):
                found.append(target)
    return found


def stop(cluster: Cluster, name: str) -> int:
    server = cluster.replicas[name]
    server.send_signal(signal.SIGTERM)
    return server.wait(20)


@pytest.fixture(scope="module")
def run(
    sf_postgres: PostgresServer, sf_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Run:
    began = time.monotonic()
    root = tmp_path_factory.mktemp("hosts")
    url = sf_postgres.create_database("multihost")
    env = {**ENV, "SF_DATABASE_URL": url, "SF_REDIS_URL": sf_redis.url}
    cluster = Cluster(root, env)
    tag = uuid.uuid4().hex[:8]
    exits: dict[str, int] = {}
    try:
        # 1. Three replicas, each on its own state directory; r2's drainer is behind.
        for name in ("r1", "r2", "r3"):
            cluster.start(name, BEHIND if name == "r2" else None)
        for server in cluster.every:
            server.wait_ready()
        cluster.live = ["r1", "r2", "r3"]
        cluster.proxy = TraefikProxy(
            [cluster.replicas[n].url for n in cluster.live], routing=ROUTING
        ).start()

        # 2. SSE clients first (sticky ones until one is pinned on each replica), then load.
        traffic = Traffic(cluster.proxy.url, cluster, [f"mh-{tag}-a", f"mh-{tag}-b"])
        pinned: set[str] = set()
        while pinned != {"r1", "r2", "r3"} and len(traffic.clients) < 8:
            i = len(traffic.clients)
            client = Client(f"sticky-{i}", traffic.sessions[i % 2], sticky=True)
            traffic.clients.append(client)
            traffic.spawn(traffic.sse_client, client)
            assert client.opened.wait(10), client.errors
            pinned.add(client.streams[0])
        for i in range(2):
            client = Client(f"hopping-{i}", traffic.sessions[i % 2], sticky=False)
            traffic.clients.append(client)
            traffic.spawn(traffic.sse_client, client)
            assert client.opened.wait(10), client.errors
        traffic.spawn(traffic.publisher)
        traffic.spawn(traffic.writer, 0, True)
        traffic.spawn(traffic.writer, 1, False)
        wait_for(lambda: traffic.writes >= 20, 20, "20 writes acknowledged")
        files = {name: open_files(s.pid, root) for name, s in cluster.replicas.items()}

        # 3. The upgrade: r4 joins, r1 drains and exits.
        cluster.start("r4").wait_ready()
        cluster.join("r4")
        cluster.leave("r1")
        exits["r1"] = stop(cluster, "r1")
        cluster.pool(cluster.live)

        # 4. r2 is SIGKILLed in its final drain, then restarted on its own state directory.
        wait_for(lambda: "r2" in traffic.acked.values(), 20, "a write acknowledged by r2")
        r2 = cluster.leave("r2")
        r2.send_signal(signal.SIGTERM)
        wait_for(
            lambda: any(s.endswith(".draining") for s in _segments(r2.state_dir)),
            20,
            "r2's final drain under way",
        )
        r2.kill()
        exits["r2 (SIGKILL)"] = r2.wait(5)
        draining = _segments(r2.state_dir)
        of_r2 = {rid for rid, rep in dict(traffic.acked).items() if rep == "r2"}
        missing = len(of_r2 - set(stored_ids(url)))
        cluster.pool(cluster.live)
        cluster.start("r2").wait_ready()
        cluster.join("r2")
        wait_for(lambda: traffic.writes >= 60, 20, "60 writes acknowledged")

        # 5. The load stops, streams catch up, the last replicas drain and exit.
        traffic.stop.set()
        for t in traffic.threads[-3:]:
            t.join(15)
        wait_for(traffic.caught_up, 10, "SSE clients caught up")
        traffic.stop_streams.set()
        for name in list(cluster.live):
            cluster.replicas[name].send_signal(signal.SIGTERM)
        for name in list(cluster.live):
            exits[name] = cluster.replicas[name].wait(20)
        for t in traffic.threads:
            t.join(15)
        result = Run(
            state_dirs={s.state_dir.name: s.state_dir for s in cluster.every},
            traffic=traffic,
            exits=exits,
            killed_with_draining=draining,
            killed_missing=missing,
            stored=stored_ids(url),
            open_files=files,
            leftovers={
                d.name: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
                for d in root.iterdir()
            },
            pids=[s.pid for s in cluster.every] + ([cluster.proxy.pid] if cluster.proxy else []),
            seconds=time.monotonic() - began,
        )
    finally:
        for server in cluster.every:
            server.close()
        if cluster.proxy is not None:
            cluster.proxy.close()
    return result


def test_replicas_share_no_file(run: Run) -> None:
    """Four state directories (r2 twice on its own), none inside another, and each replica held
    open only files of its own directory."""
    dirs = sorted(run.state_dirs.values())
    assert [d.name for d in dirs] == ["r1", "r2", "r3", "r4"]
    for a in dirs:
        for b in dirs:
            assert a == b or not a.is_relative_to(b)
    for name, paths in run.open_files.items():
        assert paths, f"{name} holds no file of its state directory open"
        assert all(Path(p).is_relative_to(run.state_dirs[name]) for p in paths), paths


def test_every_acknowledged_record_is_in_postgres_exactly_once(run: Run) -> None:
    acked = run.traffic.acked
    assert len(acked) >= 60
    assert set(acked.values()) == {"r1", "r2", "r3", "r4"}
    assert Counter(run.stored) == Counter(dict.fromkeys(acked, 1))


def test_nothing_is_left_in_any_state_dir(run: Run) -> None:
    """No file at all: no segment, nothing quarantined, no session event (they are in Redis),
    no SQLite sink or index (they are in PostgreSQL). Each volume could be deleted."""
    assert run.leftovers == {"r1": [], "r2": [], "r3": [], "r4": []}


def test_upgrade_and_restarts_exit_as_expected(run: Run) -> None:
    """r1 (upgraded away) and the last replicas drain and exit 0; r2 was killed mid-drain:
    a `.draining` file on its volume and some of its acknowledged records not delivered yet,
    which its restart on the same directory delivered (the exactly-once test above)."""
    ok = int(ExitCode.OK)
    assert run.exits == {"r1": ok, "r2 (SIGKILL)": -signal.SIGKILL, "r2": ok, "r3": ok, "r4": ok}
    assert any(s.endswith(".draining") for s in run.killed_with_draining)
    assert run.killed_missing > 0


def test_no_request_through_traefik_failed(run: Run) -> None:
    assert run.traffic.failures == []
    for client in run.traffic.clients:
        assert client.errors == [], client.name


def test_sse_clients_moving_between_replicas_get_every_event_once_in_order(run: Run) -> None:
    """Each client's events are its session's, all of them, once, in publish order, although
    its streams were served by several replicas: sticky clients on r1 and r2 moved when their
    replica stopped, hopping clients whenever they dropped their cookie."""
    traffic = run.traffic
    assert sum(map(len, traffic.published.values())) >= 40
    for client in traffic.clients:
        assert client.received == traffic.published[client.session], client.name
    for client in traffic.clients:
        if client.streams[0] in ("r1", "r2"):
            assert len(set(client.streams)) >= 2, (client.name, client.streams)
    hoppers = [c for c in traffic.clients if not c.sticky]
    assert all(len(set(c.streams)) >= 2 for c in hoppers), [c.streams for c in hoppers]


def test_idempotency_key_retries_on_another_replica_return_the_original_id(run: Run) -> None:
    replays = run.traffic.replays
    assert len(replays) >= 15
    for r in replays:
        assert (r.status, r.id, r.replayed) == (202, r.first_id, "true"), r
        assert r.replica != r.first_replica, r
    assert len({(r.first_replica, r.replica) for r in replays}) >= 3


def test_no_process_left_behind(run: Run) -> None:
    for pid in run.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
