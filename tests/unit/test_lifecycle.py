from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette

from sf_lifecycle import Lifecycle, Phase, Settings


async def test_hooks_run_in_order_with_the_deadline_then_stopped() -> None:
    lc = Lifecycle(Settings(grace_ms=5_000))
    calls: list[tuple[str, float]] = []

    async def first(deadline: float) -> None:
        calls.append(("first", deadline))

    async def second(deadline: float) -> None:
        assert lc.state.phase is Phase.DRAINING  # not stopped until every hook ran
        calls.append(("second", deadline))

    lc.on_shutdown("first", first)
    lc.on_shutdown("second", second)
    await lc.startup()
    before = time.monotonic()
    await lc.shutdown()
    assert [c[0] for c in calls] == ["first", "second"]
    assert before + 4.9 < calls[0][1] <= time.monotonic() + 5.0
    assert lc.state.phase is Phase.STOPPED
    assert lc.unfinished == []


async def test_hook_past_the_deadline_is_cancelled_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc = Lifecycle(Settings(grace_ms=100, drain_delay_ms=0))
    cancelled = asyncio.Event()
    ran_after: list[str] = []

    async def slow(deadline: float) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def later(deadline: float) -> None:
        ran_after.append("later")

    lc.on_shutdown("slow-drain", slow)
    lc.on_shutdown("later", later)
    began = time.monotonic()
    await lc.shutdown()
    assert time.monotonic() - began < 2
    assert cancelled.is_set()
    assert lc.unfinished == ["slow-drain", "later"]
    assert ran_after == []
    assert "grace budget exceeded: shutdown hook slow-drain" in caplog.text
    assert lc.state.phase is Phase.STOPPED


async def test_failing_hook_is_reported_and_the_next_still_runs() -> None:
    lc = Lifecycle(Settings())
    ran: list[str] = []

    async def broken(deadline: float) -> None:
        raise OSError("disk gone")

    async def fine(deadline: float) -> None:
        ran.append("fine")

    lc.on_shutdown("broken", broken)
    lc.on_shutdown("fine", fine)
    await lc.shutdown()
    assert lc.unfinished == ["broken"]
    assert ran == ["fine"]


async def test_shutdown_and_startup_run_once() -> None:
    lc = Lifecycle(Settings())
    runs: list[str] = []

    async def hook(deadline: float) -> None:
        runs.append("hook")

    async def task() -> None:
        runs.append("task")

    lc.on_shutdown("h", hook)
    lc.on_startup("t", task)
    await lc.startup()
    await lc.startup()
    await asyncio.sleep(0.01)
    await lc.shutdown()
    await lc.shutdown()
    assert runs == ["task", "hook"]


async def test_startup_tasks_still_running_at_shutdown_are_cancelled() -> None:
    lc = Lifecycle(Settings())
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    lc.on_startup("forever", forever)
    await lc.startup()
    await asyncio.sleep(0)
    await lc.shutdown()
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_install_runs_app_lifespan_outside_the_hooks() -> None:
    order: list[str] = []

    @contextlib.asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        order.append("app-open")
        yield
        order.append("app-close")

    lc = Lifecycle(Settings())

    async def drain(deadline: float) -> None:
        order.append("hook")

    lc.on_shutdown("drain", drain)
    app = lc.install(Starlette(lifespan=app_lifespan))
    async with app.router.lifespan_context(app):
        order.append(f"serving:{lc.state.phase}")
    assert order == ["app-open", "serving:ready", "hook", "app-close"]
    assert lc.state.phase is Phase.STOPPED
