"""`RedisEventLog` on a real redis-server: what the shared conformance tests in test_events.py
cannot show (ids from the file backend, trimming, one connection for many streams, Redis down,
the extra, the setting)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette

from sf_lifecycle import ConfigError, Lifecycle, Settings
from sf_lifecycle._errors import EventStoreUnavailable
from sf_lifecycle._events import LOST, follow, parse_event_id
from sf_lifecycle._events_file import FileEventLog
from sf_lifecycle._events_redis import RedisEventLog
from sf_lifecycle._sse import EVENTS_PATH, session_event_routes
from sf_lifecycle.testing import RedisServer


@pytest.fixture
async def log(sf_redis: RedisServer) -> AsyncIterator[RedisEventLog]:
    log = RedisEventLog(sf_redis.url, key_prefix=f"t-{uuid.uuid4().hex[:12]}:")
    yield log
    await log.aclose()


async def test_an_id_issued_by_the_file_backend_gets_a_lost_event(
    log: RedisEventLog, tmp_path: Path
) -> None:
    """A client that moved from a file-backed replica resumes with a file id: it is told
    (`lost`, `reset`) and gets every retained event, never a crash or a partial replay."""
    files = FileEventLog(tmp_path)
    file_id = await files.append("s", "from files")
    await asyncio.sleep(0.01)  # another millisecond: another epoch
    ids = [await log.append("s", i) for i in range(3)]
    got = []
    async with contextlib.aclosing(follow(log, "s", file_id)) as events:
        async for event in events:
            got.append(event)
            if len(got) == 4:
                break
    assert got[0].kind == LOST
    assert got[0].data["reason"] == "reset"
    assert got[0].data["last_event_id"] == file_id
    assert [e.id for e in got[1:]] == ids
    await files.aclose()


async def test_maxlen_trims_the_stream_and_readers_see_exactly_the_retained(
    sf_redis: RedisServer,
) -> None:
    prefix = f"t-{uuid.uuid4().hex[:12]}:"
    log = RedisEventLog(sf_redis.url, key_prefix=prefix, retention_events=10)
    ids = [await log.append("s", i) for i in range(600)]
    raw = Redis.from_url(sf_redis.url)
    try:
        length = await raw.xlen(prefix + "s")
        ttl_ms = await raw.pttl(prefix + "s")
    finally:
        await raw.aclose()
    assert length < 600 - 100  # trimmed (by whole nodes: approximately)
    assert 0 < ttl_ms <= 2 * 3_600_000  # an idle session expires
    got = await log.read_after("s", None)
    assert [e.id for e in got] == ids[-10:]
    got = await log.read_after("s", ids[100])
    assert got[0].kind == LOST
    assert got[0].data == {
        "reason": "expired",
        "last_event_id": ids[100],
        "resume_after": ids[-11],
        "lost": 489,
    }
    await log.aclose()


async def test_a_read_racing_appends_and_trimming_never_skips_silently(tmp_path: Path) -> None:
    """Steps: other replicas append (and so trim) while a reader asks for the events after the
    oldest retained position, 100 times; every answer starts right after that position, or
    with a `lost` event whose count is exact: the first event follows its `resume_after`.
    (Nodes of two entries make trimming exact, so that one concurrent append is enough.)"""
    with RedisServer(tmp_path / "redis") as server:
        raw = Redis.from_url(server.url)
        await raw.config_set("stream-node-max-entries", 2)
        await raw.aclose()
        reader = RedisEventLog(server.url, retention_events=10)
        writer = RedisEventLog(server.url, retention_events=10)
        for i in range(20):
            await writer.append("s", i)

        done = asyncio.Event()

        async def append_until_done() -> None:  # no cancel: 3.11's wait_for may swallow it
            while not done.is_set():
                await writer.append("s", "x")

        appenders = [asyncio.create_task(append_until_done()) for _ in range(8)]
        try:
            for _ in range(100):
                epoch, head = parse_event_id(str((await reader.read_after("s", None))[-1].id))
                pos = head - 9  # the oldest retained
                got = await reader.read_after("s", f"{epoch}-{pos}")
                if got[0].kind == LOST:
                    lost = got[0].data
                    assert lost["reason"] == "expired"
                    assert parse_event_id(lost["resume_after"]) == (epoch, pos + lost["lost"])
                    assert parse_event_id(str(got[1].id)) == (epoch, pos + lost["lost"] + 1)
                else:
                    assert parse_event_id(str(got[0].id)) == (epoch, pos + 1)
        finally:
            done.set()
            await asyncio.gather(*appenders, return_exceptions=True)
            await reader.aclose()
            await writer.aclose()


async def test_appends_go_on_after_the_newest_entries_were_deleted(
    log: RedisEventLog, sf_redis: RedisServer
) -> None:
    """An operator's `XDEL` of the newest entries (or `XTRIM MAXLEN 0`) does not block the
    session: appends number on from the last id Redis generated, never reusing one."""
    ids = [await log.append("s", i) for i in range(5)]
    raw = Redis.from_url(sf_redis.url)
    try:
        await raw.xdel(log.key_prefix + "s", ids[-1], ids[-2])
        epoch, seq = parse_event_id(ids[-1])
        after_del = await log.append("s", 5)
        assert parse_event_id(after_del) == (epoch, seq + 1)
        await raw.xtrim(log.key_prefix + "s", maxlen=0)
        assert parse_event_id(await log.append("s", 6)) == (epoch, seq + 2)
    finally:
        await raw.aclose()
    got = await log.read_after("s", ids[2])
    assert got[0].kind == LOST
    assert got[0].data["lost"] == 3  # the two deleted, the one trimmed
    assert [e.data for e in got[1:]] == [6]


async def test_a_thousand_waiting_streams_share_a_few_connections(
    log: RedisEventLog, sf_redis: RedisServer
) -> None:
    """Steps: 1,000 waits on 1,000 sessions; Redis sees a handful of clients (one pool, one
    blocking reader), not one per stream; one append to each wakes every wait."""
    raw = Redis.from_url(sf_redis.url)
    try:
        before = len(await raw.client_list())
        n = 1000
        sessions = [f"w{i}" for i in range(n)]
        heads = {s: await log.append(s, "first") for s in sessions}
        waits = [asyncio.create_task(log.wait(s, heads[s], 20)) for s in sessions]
        await asyncio.sleep(0.3)
        during = len(await raw.client_list())
        assert during - before <= 4, (before, during)
        assert not any(w.done() for w in waits)
        began = time.monotonic()
        await asyncio.gather(*(log.append(s, "second") for s in sessions))
        assert all(await asyncio.wait_for(asyncio.gather(*waits), 10))
        assert time.monotonic() - began < 10
    finally:
        await raw.aclose()


async def test_redis_down_raises_unavailable_fast_and_resumes_when_back(tmp_path: Path) -> None:
    """Steps: append, stop Redis: append and read raise `EventStoreUnavailable` within the
    timeout, a wait wakes (so a stream reads and ends); restart: the ids continue, no gap."""
    with RedisServer(tmp_path / "redis") as server:
        log = RedisEventLog(server.url, timeout_ms=500)
        first = await log.append("s", 1)
        waiting = asyncio.create_task(log.wait("s", first, 30))
        await asyncio.sleep(0.1)
        server.stop()
        began = time.monotonic()
        with pytest.raises(EventStoreUnavailable, match="unavailable"):
            await log.append("s", 2)
        with pytest.raises(EventStoreUnavailable):
            await log.read_after("s", first)
        assert await asyncio.wait_for(waiting, 5) is True
        assert time.monotonic() - began < 5
        server.start()
        second = await log.append("s", 3)
        assert parse_event_id(second) == (parse_event_id(first)[0], 2)
        assert [e.id for e in await log.read_after("s", first)] == [second]
        await log.aclose()


async def test_publish_answers_503_problem_when_redis_is_down(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    settings = Settings(state_dir=tmp_path, redis_url=server.url)  # never started
    lifecycle = Lifecycle(settings)
    log = RedisEventLog.from_settings(settings, timeout_ms=300)
    lifecycle.add_readiness_check("redis", log.ping, timeout_s=1.0)
    app = lifecycle.install(Starlette(routes=session_event_routes(lifecycle, log)))
    lifecycle.state.mark_ready()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post(EVENTS_PATH, params={"session": "s"}, json={"a": 1})
        assert r.status_code == 503
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["retry-after"] == "1"
        assert r.json()["code"] == "event_store_unavailable"
        ready = await c.get("/api/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"]["ok"] is False
    await log.aclose()


async def test_the_url_password_never_shows(tmp_path: Path) -> None:
    url = "redis://:hunter2@127.0.0.1:1/0"
    settings = Settings.from_env({"SF_REDIS_URL": url})
    assert settings.redis_url == url
    assert "hunter2" not in repr(settings)
    log = RedisEventLog(url, timeout_ms=200)
    assert "hunter2" not in repr(log)
    with pytest.raises(EventStoreUnavailable) as info:
        await log.ping()
    assert "hunter2" not in str(info.value)
    await log.aclose()
    with pytest.raises(ConfigError, match="SF_REDIS_URL") as bad:
        Settings.from_env({"SF_REDIS_URL": "http://:hunter2@h/0"})
    assert "hunter2" not in str(bad.value)
    for ok in ("rediss://h:6380/1", "unix:///run/redis.sock"):
        assert Settings(redis_url=ok).redis_url == ok
    with pytest.raises(ConfigError, match="redis_url"):
        Settings(redis_url="localhost:6379")


def test_core_imports_without_redis_and_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import sf_lifecycle\n"
        "assert sf_lifecycle.Settings(redis_url='redis://h').redis_url\n"
        "try:\n"
        "    sf_lifecycle.RedisEventLog('redis://h')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'sf-lifecycle[redis]'" in out.stdout


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:99999/0", "port"),
        ("redis://:hunter2@127.0.0.1:abc/0", "port"),
        ("redis://:hunter2@127.0.0.1:0/0", "port"),
        ("redis://127.0.0.1:6379/notadb", "database number"),
        ("unix://", "socket path"),
        ("redis://:hunter2@127.0.0.1:6379/0?socket_timeout=abc", "socket_timeout"),
        ("redis://127.0.0.1:6379/0?no_such_option=1", "no_such_option"),
        ("redis://:hunter2@", "no host"),
        ("redis://[::1", "unparsable"),
    ],
)
def test_a_url_redis_py_would_refuse_stops_serve_with_one_line_naming_the_variable(
    url: str, problem: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Accepted, such a URL failed every publish (500) and every probe, forever."""
    import os

    from sf_lifecycle import _cli

    monkeypatch.setattr(os, "environ", {**os.environ, "SF_REDIS_URL": url})
    assert _cli.main(["serve", "examples.sf_server:app"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sf-lifecycle: invalid SF_REDIS_URL=")
    assert len(err.strip().splitlines()) == 1
    assert problem in err
    assert "hunter2" not in err


async def test_a_client_redis_py_cannot_build_answers_503_problem_not_500(
    tmp_path: Path,
) -> None:
    """Defence behind the start-up check: if redis-py still refuses the options when the
    clients are built, a publish answers 503 problem+json and the probe fails, no 500."""
    settings = Settings(state_dir=tmp_path, redis_url="redis://127.0.0.1:1/0")
    lifecycle = Lifecycle(settings)
    log = RedisEventLog.from_settings(settings, timeout_ms=300)
    log.url = "redis://:hunter2@127.0.0.1:1/0?no_such_option=1"  # as if the check missed it
    lifecycle.add_readiness_check("redis", log.ping, timeout_s=1.0)
    app = lifecycle.install(Starlette(routes=session_event_routes(lifecycle, log)))
    lifecycle.state.mark_ready()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post(EVENTS_PATH, params={"session": "s"}, json={"a": 1})
        assert r.status_code == 503
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "event_store_unavailable"
        assert "hunter2" not in r.text
        ready = await c.get("/api/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"]["ok"] is False
        assert "hunter2" not in ready.text
    await log.aclose()
