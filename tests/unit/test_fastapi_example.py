"""The FastAPI example (`examples/fastapi_app.py`) through `httpx.ASGITransport`, started with
`sf_lifecycle.testing.started(app)`, the one call README documents."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import sqlite3
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from sf_lifecycle import Lifecycle, Phase, Settings
from sf_lifecycle.testing import started


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> types.ModuleType:
    """The example module; importing it builds `app`, which needs a state directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SF_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        return importlib.import_module("examples.fastapi_app")


def client(app: object) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_without_started_readiness_stays_starting(
    example: types.ModuleType, tmp_path: Path
) -> None:
    """ASGITransport sends no lifespan events: the replica never becomes ready by itself."""
    app = example.create_app(Settings(state_dir=tmp_path))
    async with client(app) as c:
        r = await c.get("/api/healthz")
    assert r.status_code == 503
    assert r.json()["phase"] == "starting"


async def test_started_app_serves_health_feedback_and_events(
    example: types.ModuleType, tmp_path: Path
) -> None:
    """Steps: start with `started(app)`; health 200; a greeting from FastAPI's router; a
    feedback write acknowledged (202) then delivered to the SQLite sink by the shutdown's final
    drain; an event published (201); then the shutdown leaves phase stopped. (ASGITransport
    buffers a whole response, so an SSE stream is read from a real server instead:
    tests/integration/test_metrics_process.py.)"""
    app = example.create_app(Settings(state_dir=tmp_path, replica_id="fa-1"))
    async with started(app) as lifecycle, client(app) as c:
        r = await c.get("/api/healthz")
        assert r.status_code == 200, r.text
        assert r.headers["x-sf-replica"] == "fa-1"
        assert (await c.get("/api/ready")).status_code == 200
        assert (await c.get("/api/hello")).json() == {"message": "hello", "replica": "fa-1"}
        fb = await c.post("/api/feedback", json={"rating": 5})
        assert fb.status_code == 202
        record_id = fb.json()["id"]
        pub = await c.post("/api/session/events", params={"session": "s1"}, json={"n": 1})
        assert pub.status_code == 201
    assert str(lifecycle.state.phase) == "stopped"
    with sqlite3.connect(tmp_path / "feedback.sqlite3") as db:
        ids = [row[0] for row in db.execute("SELECT id FROM feedback")]
    assert ids == [record_id]


async def test_health_routes_are_not_in_the_openapi_schema(
    example: types.ModuleType, tmp_path: Path
) -> None:
    """Deliberately hidden: the middleware answers them, FastAPI's router never sees them."""
    app = example.create_app(Settings(state_dir=tmp_path))
    async with client(app) as c:
        paths = set((await c.get("/openapi.json")).json()["paths"])
    assert paths == {"/api/hello"}


async def test_health_prefix_moves_the_health_routes(
    example: types.ModuleType, tmp_path: Path
) -> None:
    app = example.create_app(Settings(state_dir=tmp_path, health_prefix="/internal/sf"))
    async with started(app), client(app) as c:
        assert (await c.get("/internal/sf/healthz")).status_code == 200
        assert (await c.get("/internal/sf/ready")).status_code == 200
        assert (await c.get("/internal/sf/version")).status_code == 200
        # The old path is now the app's: FastAPI answers it, 404.
        assert (await c.get("/api/healthz")).status_code == 404


def _plain_app(tmp_path: Path, lifespan: Any = None) -> Starlette:
    return Lifecycle(Settings(state_dir=tmp_path)).install(Starlette(lifespan=lifespan))


async def test_started_reports_a_failing_start_up_as_a_runtime_error_naming_it(
    tmp_path: Path,
) -> None:
    @contextlib.asynccontextmanager
    async def boom(app: Starlette) -> AsyncIterator[None]:
        raise ConnectionError("database unreachable")
        yield

    with pytest.raises(
        RuntimeError, match=r"^lifespan startup failed: ConnectionError: database unreachable$"
    ):
        async with started(_plain_app(tmp_path, boom), timeout_s=2):
            pass


async def test_started_gives_up_on_a_hanging_start_up_after_timeout_s(tmp_path: Path) -> None:
    @contextlib.asynccontextmanager
    async def hang(app: Starlette) -> AsyncIterator[None]:
        await asyncio.sleep(3600)
        yield

    began = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^lifespan startup did not complete within 1 s$"):
        async with started(_plain_app(tmp_path, hang), timeout_s=1):
            pass
    assert time.monotonic() - began < 2.5  # the bound, not three of them


async def test_started_refuses_an_app_that_already_ran_or_is_running(tmp_path: Path) -> None:
    app = _plain_app(tmp_path)
    async with started(app, timeout_s=2) as outer:
        with pytest.raises(RuntimeError, match=r"already running \(nested started\(\)"):
            async with started(app, timeout_s=2):
                pass
        assert outer.state.phase is Phase.READY  # the refused inner one stopped nothing
    with pytest.raises(
        RuntimeError, match=r"already ran \(phase stopped\).*Build the app per test"
    ):
        async with started(app, timeout_s=2):
            pass
