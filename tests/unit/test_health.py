from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sf_lifecycle import Lifecycle, LifecycleMiddleware, NotReady, Settings


def make(settings: Settings | None = None) -> tuple[Lifecycle, Starlette]:
    lc = Lifecycle(settings or Settings.from_env({}))

    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse("home")

    app = lc.install(Starlette(routes=[Route("/", home)]))
    return lc, app


@pytest.fixture
async def client_and_lc() -> AsyncIterator[tuple[httpx.AsyncClient, Lifecycle]]:
    lc, app = make()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        yield c, lc


async def test_healthz_is_503_while_starting(
    client_and_lc: tuple[httpx.AsyncClient, Lifecycle],
) -> None:
    c, _ = client_and_lc
    r = await c.get("/api/healthz")
    assert r.status_code == 503
    assert r.json()["phase"] == "starting"


async def test_healthz_ready_draining_stopped(
    client_and_lc: tuple[httpx.AsyncClient, Lifecycle],
) -> None:
    c, lc = client_and_lc
    await lc.startup()
    r = await c.get("/api/healthz")
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    assert r.json() == {
        "status": "ok",
        "phase": "ready",
        "in_flight": 0,
        "in_flight_ages_s": [],
        "streams": 0,
    }

    lc.state.begin_draining()
    r = await c.get("/api/healthz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["phase"] == "draining"
    assert body["draining_for_s"] >= 0
    assert body["probes_503"] == 1
    assert lc.state.probes_503 == 1

    lc.state.mark_stopped()
    r = await c.get("/api/healthz")
    assert r.status_code == 503
    assert r.json()["phase"] == "stopped"


async def test_head_answers_status_without_body(
    client_and_lc: tuple[httpx.AsyncClient, Lifecycle],
) -> None:
    c, lc = client_and_lc
    await lc.startup()
    for path in ("/api/healthz", "/api/ready", "/api/version"):
        r = await c.head(path)
        assert r.status_code == 200, path
        assert r.content == b""
    lc.state.begin_draining()
    assert (await c.head("/api/healthz")).status_code == 503
    assert (await c.head("/api/ready")).status_code == 503


async def test_post_to_healthz_is_405(client_and_lc: tuple[httpx.AsyncClient, Lifecycle]) -> None:
    c, _ = client_and_lc
    r = await c.post("/api/healthz")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    assert "POST" in r.json()["detail"]


async def test_ready_follows_phase_with_reason(
    client_and_lc: tuple[httpx.AsyncClient, Lifecycle],
) -> None:
    c, lc = client_and_lc
    r = await c.get("/api/ready")
    assert r.status_code == 503
    assert r.json()["reason"] == "replica is starting"
    await lc.startup()
    r = await c.get("/api/ready")
    assert r.status_code == 200
    assert r.json() == {"phase": "ready", "status": "ready"}
    lc.state.begin_draining()
    r = await c.get("/api/ready")
    assert r.status_code == 503
    assert r.json()["reason"] == "replica is draining"


async def test_readiness_checks_pass_fail_and_time_out() -> None:
    lc, app = make()
    outcome: dict[str, object] = {"db": True}

    async def db() -> dict[str, object] | bool:
        result = outcome["db"]
        if isinstance(result, Exception):
            raise result
        return {"latency_ms": 3} if result is True else False

    async def slow() -> None:
        await asyncio.sleep(float(str(outcome.get("slow", 0))))

    lc.add_readiness_check("db", db, cache_s=0)
    lc.add_readiness_check("slow", slow, timeout_s=0.05, cache_s=0)
    await lc.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.get("/api/ready")
        assert r.status_code == 200
        assert r.json()["checks"]["db"] == {"ok": True, "latency_ms": 3}

        outcome["db"] = NotReady("replica lag 9 s")
        r = await c.get("/api/ready")
        assert r.status_code == 503
        assert r.json()["checks"]["db"] == {"ok": False, "reason": "replica lag 9 s"}
        assert r.json()["reason"] == "failing checks: db"

        outcome["db"] = False
        assert (await c.get("/api/ready")).json()["checks"]["db"]["ok"] is False

        outcome["db"] = RuntimeError("boom")
        assert "RuntimeError: boom" in (await c.get("/api/ready")).json()["checks"]["db"]["reason"]

        outcome["db"] = True
        outcome["slow"] = 1.0
        r = await c.get("/api/ready")
        assert r.status_code == 503
        assert r.json()["checks"]["slow"]["reason"] == "timed out after 0.05 s"
        # The proxy's probe gates on the same decision: no traffic to a replica whose check
        # fails, with the reason and the fields the rollout reads.
        r = await c.get("/api/healthz")
        assert r.status_code == 503
        assert r.json()["reasons"] == ["failing checks: slow"]
        assert r.json()["in_flight_ages_s"] == []
        assert "probes_503" not in r.json()  # not a drain probe

        outcome["slow"] = 0
        assert (await c.get("/api/healthz")).status_code == 200


def test_readiness_check_timeout_must_be_positive() -> None:
    lc, _ = make()

    async def ok() -> None:
        return None

    with pytest.raises(ValueError, match="timeout_s"):
        lc.add_readiness_check("x", ok, timeout_s=0)


async def test_ready_waits_for_startup_tasks_and_reports_failures() -> None:
    lc, app = make()
    release = asyncio.Event()

    async def recover() -> None:
        await release.wait()

    async def broken() -> None:
        raise OSError("state dir is read-only")

    lc.on_startup("recovery", recover)
    await lc.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.get("/api/ready")
        assert r.status_code == 503
        assert r.json()["reason"] == "recovery running"
        # Keyed feedback answers 503 "recovering" meanwhile: the proxy must not route here.
        r = await c.get("/api/healthz")
        assert r.status_code == 503
        assert r.json()["reasons"] == ["start-up: recovery running"]
        # Liveness is not readiness: recovering is not wedged.
        assert (await c.get("/api/livez")).status_code == 200
        release.set()
        for _ in range(100):
            if (await c.get("/api/ready")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert (await c.get("/api/ready")).status_code == 200
        assert (await c.get("/api/healthz")).status_code == 200

    lc2, app2 = make()
    lc2.on_startup("scan", broken)
    await lc2.startup()
    await asyncio.sleep(0.01)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app2), base_url="http://t") as c:
        r = await c.get("/api/ready")
        assert r.status_code == 503
        assert r.json()["reason"] == (
            "scan failed 1 time(s), retrying; last error: OSError: state dir is read-only"
        )
    await lc2.shutdown()


async def test_version_reports_settings_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    _lc, app = make(Settings(version="2.0.1", git_sha="deadbeef", replica_id="green"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.get("/api/version")
    body = r.json()
    assert r.status_code == 200
    assert set(body) == {"version", "commit", "replica", "started_at", "uptime_s"}
    assert (body["version"], body["commit"], body["replica"]) == ("2.0.1", "deadbeef", "green")
    assert body["uptime_s"] >= 0
    assert "hunter2" not in r.text


async def test_version_defaults_to_package_version() -> None:
    import sf_lifecycle

    _, app = make()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        body = (await c.get("/api/version")).json()
    assert body["version"] == sf_lifecycle.__version__
    assert body["commit"] is None


async def test_the_middleware_gives_any_asgi_app_the_health_paths() -> None:
    lc = Lifecycle(Settings())

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("inner")(scope, receive, send)

    app = LifecycleMiddleware(inner, lc)
    await lc.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        assert (await c.get("/api/healthz")).status_code == 200
        assert (await c.get("/api/ready")).status_code == 200
        assert (await c.get("/other")).text == "inner"


def test_lifecycle_is_found_from_the_app() -> None:
    lc, app = make()
    assert Lifecycle.of(app) is lc
    assert Lifecycle.of(object()) is None


async def test_check_results_are_cached_and_a_hanging_check_never_hangs_the_probe() -> None:
    """Steps: a check counted per call answers within its cache once; then a check that
    hangs (ignoring cancellation) is registered: probes answer within `PROBE_WAIT_S`, first
    with its last result, then as failing once it overran its timeout."""
    from sf_lifecycle._lifecycle import PROBE_WAIT_S

    lc, app = make()
    calls = {"n": 0}
    hang = asyncio.Event()
    release = asyncio.Event()

    async def counted() -> None:
        calls["n"] += 1
        if hang.is_set():
            while not release.is_set():  # ignores cancellation: only `release` ends it
                with contextlib.suppress(asyncio.CancelledError):
                    await release.wait()

    lc.add_readiness_check("counted", counted, timeout_s=0.2, cache_s=60)
    await lc.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        for _ in range(5):
            assert (await c.get("/api/healthz")).status_code == 200
        assert calls["n"] == 1  # five probes, one run

        lc._checks[0].cache_s = 0  # every probe wants a fresh result now
        hang.set()
        began = time.monotonic()
        r = await c.get("/api/healthz")
        assert time.monotonic() - began < PROBE_WAIT_S + 0.3
        assert r.status_code == 200  # the last result, while the new run is pending
        await asyncio.sleep(0.3)
        began = time.monotonic()
        r = await c.get("/api/healthz")
        assert time.monotonic() - began < PROBE_WAIT_S + 0.3
        assert r.status_code == 503
        assert r.json()["reasons"] == ["failing checks: counted"]
        body = (await c.get("/api/ready")).json()
        assert "ignores cancellation" in body["checks"]["counted"]["reason"]
        release.set()
    await lc.shutdown()


async def test_a_check_raising_cancelled_error_is_a_failing_check() -> None:
    """A check that awaited something another task cancelled: healthz 503 naming it, not a
    500 with a traceback at every probe."""
    lc, app = make()

    async def cancelled() -> None:
        raise asyncio.CancelledError

    lc.add_readiness_check("db", cancelled, cache_s=0)
    await lc.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        for _ in range(2):
            r = await c.get("/api/healthz")
            assert r.status_code == 503
            assert r.json()["reasons"] == ["failing checks: db"]
        body = (await c.get("/api/ready")).json()
        assert body["checks"]["db"] == {"ok": False, "reason": "CancelledError"}
    await lc.shutdown()


async def test_a_check_stuck_ignoring_cancellation_recovers_with_its_dependency() -> None:
    """Steps: a check hangs ignoring cancellation while its dependency is down: failing; the
    dependency comes back while the first attempt is still stuck: a new attempt answers and
    the replica is ready again; never more than one stuck attempt besides the current one."""
    lc, app = make()
    down = True
    running = {"now": 0, "max": 0}
    never = asyncio.Event()

    async def db() -> None:
        running["now"] += 1
        running["max"] = max(running["max"], running["now"])
        try:
            while down:  # ignores cancellation while the dependency is down
                with contextlib.suppress(asyncio.CancelledError):
                    await never.wait()
        finally:
            running["now"] -= 1

    lc.add_readiness_check("db", db, timeout_s=0.1, cache_s=0)
    await lc.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        for _ in range(4):
            assert (await c.get("/api/healthz")).status_code == 503
            await asyncio.sleep(0.3)
        assert running["max"] <= 2
        down = False
        statuses = []
        for _ in range(4):
            statuses.append((await c.get("/api/healthz")).status_code)
            await asyncio.sleep(0.3)
        assert statuses[-1] == 200, statuses
    never.set()
    await lc.shutdown()


async def test_livez_fails_only_when_the_loop_stalls_not_while_draining() -> None:
    """Steps: livez 200 when ready and while draining; block the loop longer than the stall
    limit: livez 503 naming the stall; after another stall period it is 200 again."""
    lc, app = make(Settings(liveness_stall_ms=200))
    await lc.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        assert (await c.get("/api/livez")).status_code == 200
        lc.state.begin_draining()
        assert (await c.get("/api/healthz")).status_code == 503
        r = await c.get("/api/livez")
        assert r.status_code == 200
        assert r.json()["phase"] == "draining"
        time.sleep(0.5)  # noqa: ASYNC251 - the point: a blocking call stalls the loop
        r = await c.get("/api/livez")
        assert r.status_code == 503
        assert r.json()["status"] == "stalled"
        await asyncio.sleep(0.5)
        assert (await c.get("/api/livez")).status_code == 200
    await lc.shutdown()
