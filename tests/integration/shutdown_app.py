"""The example app with misbehaving parts, chosen by environment variables, for shutdown tests.

- `SF_TEST_HOOK=KIND`: a shutdown hook registered before the feedback queue's final drain:
  `exception`, `cancelled` (raises `CancelledError` it was not sent), `keyboard`, `systemexit`,
  `baseexception`, `forever` (awaits forever), `ignores-cancel` (swallows every cancellation),
  `block` (blocks the loop 0.5 s), `sleep20` (awaits 20 s), `block20` (blocks the loop 20 s),
  `linger` (returns at once, leaving a non-daemon thread that runs 5 s: the exit waits for it).
- `SF_TEST_SINK=KIND`: the sink the queue drains to, instead of `<state>/feedback.sqlite3`
  directly: `thread-forever` (a call on a worker thread that never returns),
  `await-forever` (never returns, loop free), `loop-block` (blocks the loop 25 s), or
  `cancelled-once`, `systemexit-once`, `keyboard-once` (the first call raises a
  `CancelledError` nobody sent, `SystemExit` or `KeyboardInterrupt`; later calls deliver to
  `<state>/feedback.sqlite3`). Unset: the queue's own default sink (`<state>/feedback.sqlite3`,
  closed with the queue).
- `SF_TEST_STARTUP_FAILS=N`: a start-up task `flaky-startup` that fails N times, then succeeds.
- `SF_TEST_APP_STARTUP=KIND`: the application's own lifespan start-up `hang`s (a database that
  never answers), `block`s the loop for 30 s, or `fail`s (raises).

A hook registered after the final drain writes `<state>/after-hook-ran`: the tests check that
every hook still ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from sf_lifecycle import (
    FeedbackQueue,
    Lifecycle,
    Sink,
    SqliteSink,
    feedback_routes,
)


class _Custom(BaseException):
    pass


async def _misbehave(kind: str) -> None:
    if kind == "exception":
        raise RuntimeError("hook exploded")
    if kind == "cancelled":
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.cancel()
        await fut
    if kind == "keyboard":
        raise KeyboardInterrupt
    if kind == "systemexit":
        raise SystemExit(3)
    if kind == "baseexception":
        raise _Custom("custom")
    if kind == "forever":
        await asyncio.Event().wait()
    if kind == "ignores-cancel":
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)
    if kind == "block":
        time.sleep(0.5)  # noqa: ASYNC251 - blocking the loop is the point
    if kind == "sleep20":
        await asyncio.sleep(20)
    if kind == "block20":
        time.sleep(20)  # noqa: ASYNC251 - blocking the loop is the point
    if kind == "linger":
        threading.Thread(target=time.sleep, args=(5,), name="lingering").start()


def _once_sink(kind: str, real: SqliteSink) -> Sink:
    calls = 0

    async def sink(records: Sequence[Mapping[str, Any]]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await _misbehave(kind.removesuffix("-once"))
        await real(records)

    return sink


def _stuck_sink(kind: str) -> Sink:
    never = threading.Event()

    async def sink(records: Sequence[Mapping[str, Any]]) -> None:
        if kind == "thread-forever":
            await asyncio.to_thread(never.wait)
        elif kind == "await-forever":
            await asyncio.Event().wait()
        elif kind == "loop-block":
            time.sleep(25)  # noqa: ASYNC251 - blocking the loop is the point

    return sink


@contextlib.asynccontextmanager
async def _app_lifespan(app: Starlette) -> AsyncIterator[None]:
    kind = os.environ.get("SF_TEST_APP_STARTUP", "")
    if kind == "hang":
        await asyncio.Event().wait()
    if kind == "block":
        time.sleep(30)  # noqa: ASYNC251 - blocking the loop is the point
    if kind == "fail":
        raise ConnectionError("the database did not answer")
    yield


def create_app() -> Starlette:
    lifecycle = Lifecycle()
    cfg = lifecycle.settings
    state_dir = cfg.require_state_dir()

    fails = int(os.environ.get("SF_TEST_STARTUP_FAILS", "0") or 0)
    attempts = 0

    async def flaky() -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= fails:
            raise ConnectionError(f"sink unreachable at {state_dir}/upstream.sock")

    if fails:
        lifecycle.on_startup("flaky-startup", flaky)

    hook_kind = os.environ.get("SF_TEST_HOOK", "")

    async def bad_hook(deadline: float) -> None:
        await _misbehave(hook_kind)

    if hook_kind:
        lifecycle.on_shutdown("bad-hook", bad_hook)

    queue = FeedbackQueue(state_dir, settings=cfg)
    sink_kind = os.environ.get("SF_TEST_SINK", "")
    if sink_kind.endswith("-once"):
        real = SqliteSink(state_dir / "feedback.sqlite3")
        queue.on_close(real.close)
        queue.install(lifecycle, _once_sink(sink_kind, real))
    else:
        queue.install(lifecycle, _stuck_sink(sink_kind) if sink_kind else None)

    async def after(deadline: float) -> None:
        Path(state_dir, "after-hook-ran").write_text("yes")  # noqa: ASYNC240 - tiny

    lifecycle.on_shutdown("after-hook", after)
    return lifecycle.install(
        Starlette(routes=[*feedback_routes(queue, lifecycle)], lifespan=_app_lifespan)
    )


app = create_app()
