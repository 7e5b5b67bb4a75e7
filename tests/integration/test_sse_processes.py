"""Session event streams across a real upgrade: two replica processes on one state directory."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from sf_lifecycle._events import parse_event_id
from sf_lifecycle.testing import ServerProcess

pytestmark = pytest.mark.integration
URL = "/api/session/events"


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Replicas A and B of the example server, sharing one state directory."""
    env = {"SF_DRAIN_DELAY_MS": "1500", "SF_SSE_RETRY_MS": "250"}
    a = ServerProcess(state_dir=tmp_path, env={**env, "SF_REPLICA_ID": "a"})
    b = ServerProcess(state_dir=tmp_path, env={**env, "SF_REPLICA_ID": "b"})
    try:
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.close()
        b.close()


@dataclass
class Received:
    event_id: str
    data: object
    at: float


@dataclass
class Reader:
    """Reads one SSE connection on a thread until it ends or `until` ids have arrived."""

    server: ServerProcess
    session: str
    last_id: str | None = None
    until: set[str] = field(default_factory=set)
    count: int | None = None
    events: list[Received] = field(default_factory=list)
    retry: int | None = None
    ended_at: float | None = None
    error: BaseException | None = None
    connected: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Reader:
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        assert self.connected.wait(5), "stream did not open"
        return self

    def _run(self) -> None:
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        try:
            with (
                httpx.Client(base_url=self.server.url, timeout=10) as c,
                connect_sse(
                    c, "GET", URL, params={"session": self.session}, headers=headers
                ) as src,
            ):
                assert src.response.status_code == 200
                self.connected.set()
                for sse in src.iter_sse():
                    if sse.retry is not None:
                        self.retry = sse.retry
                    if sse.data:  # pings after an id echo that id with no data
                        self.events.append(Received(sse.id, json.loads(sse.data), time.monotonic()))
                        if self.until and self.until <= {e.event_id for e in self.events}:
                            return
                        if self.count is not None and len(self.events) >= self.count:
                            return
            self.ended_at = time.monotonic()
        except BaseException as exc:
            self.error = exc
            self.connected.set()

    def join(self, timeout: float) -> Reader:
        self._t.join(timeout)
        assert not self._t.is_alive(), "stream reader did not finish"
        assert self.error is None, self.error
        return self


class Publisher:
    """Publishes numbered events every `interval_s`, to A while it listens, then to B."""

    def __init__(self, a: ServerProcess, b: ServerProcess, session: str, interval_s: float):
        self.targets = [a, b]
        self.session = session
        self.interval_s = interval_s
        self.ids: list[str] = []
        self.sent_at: list[float] = []
        self.via: list[str] = []
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Publisher:
        self._t.start()
        return self

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                self._publish(n)
                n += 1
                time.sleep(self.interval_s)
        except BaseException as exc:
            self.error = exc

    def _publish(self, n: int, pad: int = 0) -> None:
        body = json.dumps({"n": n, "pad": "x" * pad} if pad else {"n": n}).encode()
        headers = {"content-type": "application/json"}
        path = f"{URL}?session={self.session}"
        while True:
            target = self.targets[0]
            try:
                status, _, raw = target.get(path, method="POST", body=body, headers=headers)
            except OSError:  # A's listener closed: the proxy would now route to B
                if len(self.targets) == 1:
                    raise
                self.targets.pop(0)
                continue
            assert status == 201, raw
            self.ids.append(json.loads(raw)["id"])
            self.sent_at.append(time.monotonic())
            self.via.append("a" if len(self.targets) == 2 else "b")
            return

    def stop(self) -> list[str]:
        self._stop.set()
        self._t.join(10)
        assert self.error is None, self.error
        return self.ids


def test_stream_survives_an_upgrade_with_every_event_once_in_order(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    """Steps:
    1. a client streams session `up` from replica A while events are published every 50 ms;
    2. A gets SIGTERM (drain delay 1.5 s): its stream keeps delivering during the delay;
    3. when the delay ends the stream gets `retry: 250` and ends; A exits 0 promptly;
    4. publishing moves to B once A's listener is closed (what the proxy does);
    5. the client reconnects to B with its `Last-Event-ID` and reads until the last event;
    6. across both connections every published event arrived exactly once, in order.
    """
    a, b = replicas
    reader_a = Reader(a, "up").start()
    pub = Publisher(a, b, "up", 0.05).start()
    time.sleep(0.5)
    sigterm = time.monotonic()
    a.send_signal(signal.SIGTERM)
    reader_a.join(6)
    exit_code = a.wait(5)
    exited = time.monotonic()

    # The stream flowed during the drain delay and ended only after it, with the hint.
    assert reader_a.ended_at is not None
    assert reader_a.retry == 250
    during = [e for e in reader_a.events if sigterm + 0.1 < e.at < sigterm + 1.4]
    assert len(during) >= 10, [e.at - sigterm for e in reader_a.events]
    assert 1.45 <= reader_a.ended_at - sigterm < 2.5
    # A did not wait on the open stream: it exited right after the delay.
    assert exit_code == 0, a.logs()
    assert exited - sigterm < 3.0, a.logs()

    # Reconnect to B from the last id seen; keep publishing a little, then stop.
    last_seen = reader_a.events[-1].event_id
    time.sleep(0.3)
    ids = pub.stop()
    assert "b" in pub.via
    assert "a" in pub.via
    reader_b = Reader(b, "up", last_id=last_seen, until={ids[-1]}).start().join(10)

    got = [e.event_id for e in reader_a.events + reader_b.events]
    assert got == ids  # exactly once, in publish order
    assert [e.data for e in reader_a.events + reader_b.events] == [
        {"n": i} for i in range(len(ids))
    ]
    assert [parse_event_id(i) for i in got] == sorted(parse_event_id(i) for i in got)


def test_events_published_on_one_replica_reach_a_stream_on_the_other(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    """Steps: stream session `x` from B; publish 20 events on A; B's stream delivers each
    within a second of its publication (the file log is polled every 50 ms)."""
    a, b = replicas
    reader = Reader(b, "x", count=20).start()
    # While it is open, B's healthz counts the stream and nothing in flight.
    health = json.loads(b.get("/api/healthz")[2])
    assert (health["streams"], health["in_flight"]) == (1, 0)
    pub = Publisher(a, b, "x", 0.02)
    for n in range(20):
        pub._publish(n)
        time.sleep(0.02)
    reader.join(10)
    assert [e.event_id for e in reader.events] == pub.ids
    latencies = [r.at - s for r, s in zip(reader.events, pub.sent_at, strict=True)]
    assert max(latencies) < 1.0, latencies


def test_compaction_on_one_replica_never_makes_the_other_quarantine_a_healthy_log(
    tmp_path: Path,
) -> None:
    """Issue 11, defect 5, as reproduced: two replicas, `retention_events=4`.

    Steps:
    1. replicas A and B on one state directory keep 4 events per session, so every burst of
       appends makes B compact the file (temp file + `os.replace`; ext4 often hands the new
       file an inode number the old one had);
    2. a client streams session `c` from A while B publishes bursts of 1 to 4 events, waiting
       after each burst until the stream has them, 60 bursts (about 70 compactions);
    3. the stream got every event once, in order, with no `lost` event; nothing was
       quarantined and neither replica logged an error.
    """
    env = {"SF_DRAIN_DELAY_MS": "0", "SF_SSE_RETENTION_EVENTS": "4"}
    a = ServerProcess(state_dir=tmp_path, env={**env, "SF_REPLICA_ID": "a"})
    b = ServerProcess(state_dir=tmp_path, env={**env, "SF_REPLICA_ID": "b"})
    try:
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        bursts = [1 + (i * 7) % 4 for i in range(60)]  # 1 to 4: never more than retention
        reader = Reader(a, "c", count=sum(bursts)).start()
        pub = Publisher(b, b, "c", 0)
        n = 0
        for burst in bursts:
            for _ in range(burst):
                pub._publish(n, pad=n * 7 % 23)
                n += 1
            deadline = time.monotonic() + 5
            while len(reader.events) < n and reader.error is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(reader.events) >= n, (
                f"stream stalled at {len(reader.events)} of {n}; A logged:\n{a.logs()[-1500:]}"
            )
        reader.join(10)
        assert [e.event_id for e in reader.events] == pub.ids
        assert [e.data["n"] for e in reader.events] == list(range(n))  # type: ignore[index]
        sessions = tmp_path / "sessions"
        assert sorted(p.name for p in sessions.iterdir()) == ["c.lock", "c.log"]
        for replica in (a, b):
            assert " ERROR " not in replica.logs()
            assert "corrupt" not in replica.logs()
    finally:
        a.close()
        b.close()
