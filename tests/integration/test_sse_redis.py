"""Session event streams on Redis across real replica processes that share no file."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from sf_lifecycle.testing import RedisServer, ServerProcess

pytestmark = pytest.mark.integration
URL = "/api/session/events"
ENV = {"SF_SSE_RETRY_MS": "200", "SF_DRAIN_DELAY_MS": "200"}


@dataclass
class Stream:
    """One SSE connection read on a thread: events (id, data) and the `retry:` it ended with."""

    url: str
    session: str
    last_id: str | None = None
    count: int | None = None
    events: list[tuple[str, object]] = field(default_factory=list)
    retry: int | None = None
    status: int | None = None
    error: BaseException | None = None
    opened: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Stream:
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        assert self.opened.wait(10), "stream did not open"
        return self

    def _run(self) -> None:
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        try:
            with (
                httpx.Client(base_url=self.url, timeout=10) as c,
                connect_sse(c, "GET", URL, params={"session": self.session}, headers=headers) as s,
            ):
                self.status = s.response.status_code
                self.opened.set()
                for sse in s.iter_sse():
                    if sse.retry is not None:
                        self.retry = sse.retry
                    if sse.data:
                        self.events.append((sse.id, json.loads(sse.data)))
                        if self.count is not None and len(self.events) >= self.count:
                            return
        except BaseException as exc:
            self.error = exc
            self.opened.set()

    def join(self, timeout: float = 10) -> Stream:
        self._t.join(timeout)
        assert not self._t.is_alive(), f"stream did not end; got {self.events}"
        assert self.error is None, self.error
        return self


def publish(server: ServerProcess, session: str, data: object) -> tuple[int, dict[str, object]]:
    status, _, raw = server.get(
        f"{URL}?session={session}",
        method="POST",
        body=json.dumps(data).encode(),
        headers={"content-type": "application/json"},
    )
    return status, json.loads(raw)


def published_id(server: ServerProcess, session: str, data: object, retries: int = 0) -> str:
    """Publish; on 503 retry up to `retries` times after a short pause (as a client that
    honours `Retry-After` would, shortened)."""
    status, body = publish(server, session, data)
    while status == 503 and retries > 0:
        time.sleep(0.1)
        retries -= 1
        status, body = publish(server, session, data)
    assert status == 201, body
    return str(body["id"])


@pytest.fixture
def replicas(sf_redis: RedisServer, tmp_path: Path) -> Iterator[tuple[ServerProcess, ...]]:
    """Replicas A and B of the example server: separate state directories, one Redis."""
    env = {**ENV, "SF_REDIS_URL": sf_redis.url}
    servers = [
        ServerProcess(state_dir=tmp_path / name, env={**env, "SF_REPLICA_ID": name})
        for name in ("a", "b")
    ]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        yield tuple(servers)
    finally:
        for s in servers:
            s.close()


def test_a_client_moving_between_replicas_gets_every_event_once_in_order(
    replicas: tuple[ServerProcess, ...],
) -> None:
    """Steps: 1. a stream on A; events published alternately to A and B all arrive on it,
    in order (cross-replica live delivery). 2. The client leaves; more events go to B. 3. It
    reconnects to B with its Last-Event-ID: exactly the events it missed, once, in order.
    4. Nothing of the session is in either state directory (they share no file)."""
    a, b = replicas
    session = f"move-{uuid.uuid4().hex[:8]}"
    first = Stream(a.url, session, count=6).start()
    ids = [published_id((a, b)[i % 2], session, {"n": i}) for i in range(6)]
    first.join()
    assert first.events == [(ids[i], {"n": i}) for i in range(6)]

    missed = [published_id(b, session, {"n": i}) for i in range(6, 10)]
    second = Stream(b.url, session, last_id=first.events[-1][0], count=4).start()
    second.join()
    assert second.events == [(missed[i - 6], {"n": i}) for i in range(6, 10)]
    for server in replicas:
        assert not list((server.state_dir / "sessions").glob(f"{session}*"))


def test_redis_restart_ends_streams_with_retry_and_they_resume_without_a_gap(
    tmp_path: Path,
) -> None:
    """Steps: 1. one replica on its own Redis; a stream receives two events. 2. Redis stops:
    the stream ends with `retry: 200`; a publish answers 503 problem+json; /api/ready is 503.
    3. Redis restarts (its append-only file kept the stream): the client reconnects with its
    Last-Event-ID and receives the events published after the restart (a publish may meet one
    more 503 on a connection the restart closed, and is retried), none lost, none twice."""
    with RedisServer(tmp_path / "redis") as redis:
        server = ServerProcess(state_dir=tmp_path / "state", env={**ENV, "SF_REDIS_URL": redis.url})
        try:
            server.start()
            server.wait_ready()
            session = "restart"
            stream = Stream(server.url, session).start()
            ids = [published_id(server, session, {"n": n}) for n in range(2)]
            deadline = time.monotonic() + 10
            while len(stream.events) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)

            redis.stop()
            stream.join()
            assert stream.events == [(ids[0], {"n": 0}), (ids[1], {"n": 1})]
            assert stream.retry == 200
            status, body = publish(server, session, {"n": "lost?"})
            assert status == 503
            assert body["code"] == "event_store_unavailable"
            # Check results are cached (1 s) and the check times out (1 s): /api/ready turns
            # 503 within that, plus a margin for a loaded machine.
            deadline = time.monotonic() + 1.0 + 1.0 + 3.0
            status, _, raw = server.get("/api/ready")
            while status != 503 and time.monotonic() < deadline:
                time.sleep(0.1)
                status, _, raw = server.get("/api/ready")
            assert status == 503
            assert json.loads(raw)["checks"]["redis"]["ok"] is False

            redis.start()
            server.wait_ready()
            resumed = Stream(server.url, session, last_id=ids[-1], count=2).start()
            later = [published_id(server, session, {"n": n}, retries=5) for n in range(2, 4)]
            resumed.join()
            assert resumed.status == 200
            assert resumed.events == [(later[0], {"n": 2}), (later[1], {"n": 3})]
        finally:
            server.close()
