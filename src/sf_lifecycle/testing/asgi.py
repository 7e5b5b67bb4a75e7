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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import ASGIApp, Message

from .._lifecycle import Lifecycle

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
        RuntimeError: the app's start-up or shutdown failed (its message), or was not
            ready within `timeout_s` (the readiness body says why).
    """
    lifecycle = Lifecycle.of(app)
    if lifecycle is None:
        raise ValueError("started(app): the app has no sf_lifecycle Lifecycle installed")
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

    async def reply(expected: str) -> None:
        getter = asyncio.ensure_future(outbox.get())
        done, _ = await asyncio.wait(
            {getter, task}, timeout=timeout_s, return_when="FIRST_COMPLETED"
        )
        if getter not in done:
            getter.cancel()
            if task in done and task.exception() is not None:
                raise RuntimeError(f"lifespan {expected} failed: {task.exception()!r}")
            raise RuntimeError(f"lifespan {expected} did not complete within {timeout_s} s")
        message = getter.result()
        if message["type"] != f"lifespan.{expected}.complete":
            raise RuntimeError(f"lifespan {expected} failed: {message.get('message', message)}")

    try:
        await inbox.put({"type": "lifespan.startup"})
        await reply("startup")
        if ready:
            await _wait_ready(lifecycle, timeout_s)
        yield lifecycle
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        try:
            await reply("shutdown")
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout_s)


async def _wait_ready(lifecycle: Lifecycle, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        ok, body = await lifecycle.readiness()
        if ok:
            return
        if asyncio.get_running_loop().time() >= deadline:
            raise RuntimeError(f"not ready within {timeout_s} s: {body}")
        await asyncio.sleep(0.01)
