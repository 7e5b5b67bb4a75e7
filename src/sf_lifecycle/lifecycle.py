"""`Lifecycle`: the one object an application holds.

It ties together the settings, the phase (`ShutdownState`), readiness checks, background start-up
work (orphan recovery) and shutdown hooks (the final queue drain). The runner flips its phase on
SIGTERM; the health routes and the middleware read it; the application's lifespan runs its hooks.

Shutdown hooks run inside the ASGI lifespan shutdown, after the server has stopped accepting and
in-flight requests have finished. That one path serves both `sf-lifecycle serve` (which sets the
deadline from SIGTERM) and plain uvicorn (which gives no drain delay but still runs the lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._errors import NotReady
from .config import Settings
from .state import Phase, ShutdownState

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["Lifecycle", "ReadinessCheck", "ShutdownHook"]

logger = logging.getLogger("sf_lifecycle.lifecycle")

#: A readiness check: returns details to show (or None); raises `NotReady` or returns False to fail.
ReadinessCheck = Callable[[], Awaitable[Mapping[str, Any] | bool | None]]
#: A shutdown hook: receives the monotonic deadline it must respect.
ShutdownHook = Callable[[float], Awaitable[None]]
#: Start-up work run in the background once the server listens; ready stays 503 until it ends.
StartupTask = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class _Check:
    name: str
    fn: ReadinessCheck
    timeout_s: float


@dataclass(slots=True)
class _Hook:
    name: str
    fn: ShutdownHook


class Lifecycle:
    """Lifecycle of one replica process.

    Args:
        settings: All settings; `Settings.from_env()` when None.
        state: The phase machine; a new one when None (tests inject their own).
    """

    def __init__(self, settings: Settings | None = None, state: ShutdownState | None = None):
        self.settings = settings if settings is not None else Settings.from_env()
        self.state = state if state is not None else ShutdownState()
        self.started_wall = time.time()
        self.started_monotonic = time.monotonic()
        self._checks: list[_Check] = []
        self._hooks: list[_Hook] = []
        self._startup: list[tuple[str, StartupTask]] = []
        self._startup_pending: set[str] = set()
        self._startup_failed: dict[str, str] = {}
        self._startup_tasks: set[asyncio.Task[None]] = set()
        #: Monotonic deadline for shutdown work; set by the runner at SIGTERM.
        self.deadline: float | None = None
        #: Names of hooks that did not finish within the budget (the runner's exit code reads it).
        self.unfinished: list[str] = []
        self._started = False
        self._shut_down = False

    # -- registration ----------------------------------------------------------------------
    def add_readiness_check(
        self, name: str, check: ReadinessCheck, *, timeout_s: float = 2.0
    ) -> None:
        """Register an async check that `/api/ready` runs on each probe.

        A check fails when it raises (`NotReady` for a clean reason), returns False, or takes
        longer than `timeout_s`. Keep checks cheap: they run on every readiness probe.
        """
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._checks.append(_Check(name, check, timeout_s))

    def on_shutdown(self, name: str, hook: ShutdownHook) -> None:
        """Register work to run once requests are finished, e.g. the final queue drain.

        Hooks run in registration order and receive the monotonic deadline of the grace budget.
        A hook still running at the deadline is cancelled and reported as unfinished.
        """
        self._hooks.append(_Hook(name, hook))

    def on_startup(self, name: str, task: StartupTask) -> None:
        """Register background start-up work (orphan recovery): ready is 503 until it finishes."""
        self._startup.append((name, task))

    # -- readiness -------------------------------------------------------------------------
    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Run the checks; return (ready, body) for `/api/ready`."""
        phase = self.state.phase
        body: dict[str, Any] = {"phase": str(phase)}
        if phase is not Phase.READY:
            body["reason"] = f"replica is {phase}"
            return False, body
        if self._startup_pending or self._startup_failed:
            reasons = [f"{n} running" for n in sorted(self._startup_pending)]
            reasons += [f"{n} failed: {e}" for n, e in sorted(self._startup_failed.items())]
            body["reason"] = "; ".join(reasons)
        results = await asyncio.gather(*(self._run_check(c) for c in self._checks))
        checks = dict(zip((c.name for c in self._checks), results, strict=True))
        if checks:
            body["checks"] = checks
        failed = [n for n, r in checks.items() if not r["ok"]]
        if failed and "reason" not in body:
            body["reason"] = "failing checks: " + ", ".join(failed)
        return "reason" not in body, body

    async def _run_check(self, check: _Check) -> dict[str, Any]:
        try:
            async with asyncio.timeout(check.timeout_s):
                result = await check.fn()
        except NotReady as exc:
            return {"ok": False, "reason": exc.reason}
        except TimeoutError:
            return {"ok": False, "reason": f"timed out after {check.timeout_s:g} s"}
        except Exception as exc:
            logger.warning("readiness check %s raised %r", check.name, exc)
            return {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
        if result is False:
            return {"ok": False, "reason": "check returned False"}
        out: dict[str, Any] = {"ok": True}
        if isinstance(result, Mapping):
            out.update(result)
        return out

    # -- lifespan --------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """ASGI lifespan: ready on entry (start-up work continues in the background), hooks on exit.

        Use it as `Starlette(lifespan=lifecycle.lifespan)` or enter it from your own lifespan.
        """
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        """Mark the replica ready and start the registered background start-up work (once)."""
        if self._started:
            return
        self._started = True
        for name, task in self._startup:
            self._startup_pending.add(name)
            t = asyncio.create_task(self._run_startup(name, task), name=f"sf-startup-{name}")
            self._startup_tasks.add(t)
            t.add_done_callback(self._startup_tasks.discard)
        if self.state.mark_ready():
            logger.info("ready after %.0f ms", (time.monotonic() - self.started_monotonic) * 1000)

    async def _run_startup(self, name: str, task: StartupTask) -> None:
        began = time.monotonic()
        try:
            await task()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("start-up task %s failed", name)
            self._startup_failed[name] = f"{type(exc).__name__}: {exc}"
        else:
            logger.info("start-up task %s done in %.0f ms", name, (time.monotonic() - began) * 1e3)
        finally:
            self._startup_pending.discard(name)

    async def shutdown(self) -> None:
        """Run shutdown hooks within the grace budget, then mark the process stopped.

        Under `sf-lifecycle serve` the deadline was set at SIGTERM; otherwise (plain uvicorn) the
        budget starts now. Runs once; later calls return at once.
        """
        if self._shut_down:
            return
        self._shut_down = True
        if self.state.begin_draining():
            logger.info("draining (lifespan shutdown without a signal)")
        if self.deadline is None:
            self.deadline = time.monotonic() + self.settings.grace_ms / 1000
        draining = self.state.since(Phase.DRAINING)
        if draining is not None:
            logger.info(
                "in-flight requests finished %.0f ms after draining began; %d shutdown hook(s)",
                (time.monotonic() - draining.monotonic) * 1000,
                len(self._hooks),
            )
        for t in list(self._startup_tasks):
            t.cancel()
        for hook in self._hooks:
            remaining = self.deadline - time.monotonic()
            began = time.monotonic()
            if remaining <= 0:
                self.unfinished.append(hook.name)
                logger.error("grace budget spent: shutdown hook %s not run", hook.name)
                continue
            try:
                async with asyncio.timeout(remaining):
                    await hook.fn(self.deadline)
            except TimeoutError:
                self.unfinished.append(hook.name)
                logger.error(
                    "grace budget exceeded: shutdown hook %s cancelled after %.0f ms",
                    hook.name,
                    (time.monotonic() - began) * 1000,
                )
            except Exception:
                self.unfinished.append(hook.name)
                logger.exception("shutdown hook %s failed", hook.name)
            else:
                logger.info(
                    "shutdown hook %s done in %.0f ms", hook.name, (time.monotonic() - began) * 1e3
                )
        self.state.mark_stopped()

    # -- wiring ----------------------------------------------------------------------------
    def install(self, app: Starlette) -> Starlette:
        """Wire this lifecycle into a Starlette (or FastAPI) app and return it.

        Adds the in-flight middleware, which also answers `/api/healthz`, `/api/ready` and
        `/api/version`, and wraps the app's lifespan so hooks run on shutdown. The runner finds
        the lifecycle again through `app.state.sf_lifecycle`.
        """
        from .middleware import LifecycleMiddleware

        app.add_middleware(LifecycleMiddleware, lifecycle=self)
        inner = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(a: Any) -> AsyncIterator[Any]:
            # The app's own start-up runs first and its clean-up last, so hooks (the final
            # queue drain) still find the resources the app opened.
            async with inner(a) as state, self.lifespan(a):
                yield state

        app.router.lifespan_context = lifespan
        app.state.sf_lifecycle = self
        return app

    @staticmethod
    def of(app: object) -> Lifecycle | None:
        """Find the lifecycle an app was built with (`install()`, the middleware, an attribute)."""
        seen = 0
        while app is not None and seen < 32:
            seen += 1
            found = getattr(app, "lifecycle", None)
            if isinstance(found, Lifecycle):
                return found
            state = getattr(app, "state", None)
            found = getattr(state, "sf_lifecycle", None)
            if isinstance(found, Lifecycle):
                return found
            app = getattr(app, "app", None)
        return None
