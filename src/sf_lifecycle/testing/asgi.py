"""`started(app)`: an app's lifespan run in process, for tests over `httpx.ASGITransport`.

httpx's ASGI transport (and any client that calls the app directly) sends no lifespan events,
so a lifecycle installed on the app never starts: `/api/healthz` answers 503 "starting", the
queue never recovers nor drains, shutdown hooks never run. One call fixes that:

    async with started(app) as lifecycle:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            ...

It speaks the ASGI lifespan protocol to the app (so the app's own lifespan runs too, as under a
server), waits until `/api/ready` would answer 200 (start-up recovery done, checks passing), and
on exit runs the shutdown (hooks, the final queue drain). Starlette's `TestClient` runs the
lifespan itself when used as a context manager; this is the same for async tests.

A `Lifecycle` starts once and stops once, like the process it stands for: its shutdown closes
the feedback queue and ends its start-up work for good. So `started(app)` refuses an app whose
lifecycle already ran (a module-level app shared by two tests: build the app per test, from a
fixture calling the app's factory) or is running (a nested `started(app)`, whose exit would
stop the outer one), with a `RuntimeError` saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import ASGIApp, Message

from .._lifecycle import Lifecycle
from .._state import Phase

__all__ = ["started"]


@contextlib.asynccontextmanager
async def started(
    app: ASGIApp, *, ready: bool = True, timeout_s: float = 10.0
) -> AsyncIterator[Lifecycle]:
    """Run `app`'s lifespan start-up, yield its `Lifecycle`, run its shutdown on exit.

    Args:
        app: The ASGI app, with a lifecycle installed (`Lifecycle.install`, the middleware).
        ready: Also wait until the lifecycle's readiness passes (start-up recovery done).
        timeout_s: Bound on the start-up (and on the wait for readiness) and on the shutdown.

    Raises:
        ValueError: the app has no lifecycle.
        RuntimeError: the app's start-up or shutdown failed (the exception it raised), or
            was not ready within `timeout_s` in all (the readiness body says why); or the
            app's lifecycle already ran or is running (a Lifecycle starts once).
    """
    lifecycle = Lifecycle.of(app)
    if lifecycle is None:
        raise ValueError("started(app): the app has no sf_lifecycle Lifecycle installed")
    phase = lifecycle.state.phase
    if phase is Phase.READY:
        raise RuntimeError(
            "started(app): the app's lifecycle is already running (nested started() on the "
            "same app?); its exit would stop the outer one. Use the Lifecycle it yielded"
        )
    if phase is not Phase.STARTING:
        raise RuntimeError(
            f"started(app): the app's lifecycle already ran (phase {phase}); a Lifecycle "
            "starts and stops once (its shutdown closes the queue). Build the app per test: a "
            "fixture calling the app's factory (README, FastAPI)"
        )
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    scope: dict[str, Any] = {
        "type": "lifespan",
        "asgi": {"version": "3.0", "spec_version": "2.0"},
        "state": {},
    }

    async def run() -> None:
        await app(scope, inbox.get, outbox.put)

    task = asyncio.create_task(run(), name="sf-testing-lifespan")
    loop = asyncio.get_running_loop()

    async def reply(expected: str, deadline: float) -> None:
        getter = asyncio.ensure_future(outbox.get())
        done, _ = await asyncio.wait(
            {getter, task}, timeout=max(0.0, deadline - loop.time()), return_when="FIRST_COMPLETED"
        )
        if getter not in done:
            getter.cancel()
            if task in done and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"lifespan {expected} failed: {task.exception()!r}")
            raise RuntimeError(f"lifespan {expected} did not complete within {timeout_s} s")
        message = getter.result()
        if message["type"] != f"lifespan.{expected}.complete":
            # Starlette sends the whole traceback: its last line names the exception.
            lines = str(message.get("message") or message).strip().splitlines()
            raise RuntimeError(f"lifespan {expected} failed: {lines[-1] if lines else message}")

    async def abandon() -> None:
        """End the lifespan task without letting its exception replace the one reported."""
        if not task.done():
            task.cancel()
        await asyncio.wait({task}, timeout=timeout_s)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the RuntimeError raised already names it

    deadline = loop.time() + timeout_s  # start-up and readiness share one bound
    try:
        await inbox.put({"type": "lifespan.startup"})
        await reply("startup", deadline)
        if ready:
            await _wait_ready(lifecycle, deadline, timeout_s)
    except BaseException:
        await abandon()
        raise
    try:
        yield lifecycle
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        try:
            await reply("shutdown", loop.time() + timeout_s)
            await asyncio.wait({task}, timeout=timeout_s)
        finally:
            await abandon()


async def _wait_ready(lifecycle: Lifecycle, deadline: float, timeout_s: float) -> None:
    while True:
        ok, body = await lifecycle.readiness()
        if ok:
            return
        if asyncio.get_running_loop().time() >= deadline:
            raise RuntimeError(f"not ready within {timeout_s} s: {body}")
        await asyncio.sleep(0.01)
