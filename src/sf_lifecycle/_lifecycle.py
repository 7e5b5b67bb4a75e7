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
import errno
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ._background import stops_task
from ._config import Settings
from ._errors import BudgetExceeded, NotReady
from ._liveness import Heartbeat
from ._logging import ensure_logging
from ._middleware import LifecycleMiddleware
from ._redact import describe_error
from ._state import Phase, ShutdownState
from ._stats import Stats

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["Lifecycle", "ReadinessCheck", "ShutdownHook"]

#: `install` returns the app it was given, with its type (a `FastAPI` stays a `FastAPI`).
_AppT = TypeVar("_AppT", bound="Starlette")

logger = logging.getLogger("sf_lifecycle.lifecycle")

#: A readiness check: returns details to show (or None); raises `NotReady` or returns False to fail.
ReadinessCheck = Callable[[], Awaitable[Mapping[str, Any] | bool | None]]
#: A shutdown hook: receives the monotonic deadline it must respect.
ShutdownHook = Callable[[float], Awaitable[None]]
#: Start-up work run in the background once the server listens; ready stays 503 until it ends.
StartupTask = Callable[[], Awaitable[None]]

#: First pause before a failed start-up task runs again; it doubles up to the cap (+-20% jitter).
STARTUP_RETRY_FIRST_S = 0.2
STARTUP_RETRY_MAX_S = 5.0

#: How long a hook cancelled at the end of its share may take to unwind before it is abandoned.
_HOOK_CANCEL_GRACE_S = 0.1
#: Taken off the end of each hook's share (at most a quarter of it): the deadline a hook receives
#: comes this long before its share ends, so one that watches its deadline can give up by itself
#: (raising `BudgetExceeded` once it has put its files back) and be reported as that, not cut
#: off mid-way and reported "cancelled", without the shutdown running past its deadline.
_HOOK_GIVE_UP_S = 0.05


async def _guarded(hook: ShutdownHook, deadline: float) -> tuple[BaseException | None, float]:
    """Run `hook`; return what it raised instead of raising it, and when it ended (monotonic).

    Everything is caught, `BaseException` included: raised inside a task, `SystemExit` and
    `KeyboardInterrupt` would escape the event loop. A real Ctrl-C reaches the runner as a
    signal, never as this exception; raised here, it is code in the hook giving up. Only a
    cancellation sent to this task (the hook's share of the budget ran out) propagates; a
    `CancelledError` the hook raised by itself (it awaited a future someone else cancelled) is a
    failure of that hook like any other.
    """
    try:
        await hook(deadline)
    except BaseException as exc:
        if stops_task(exc):
            raise
        return exc, time.monotonic()
    return None, time.monotonic()


@dataclass(slots=True)
class _StartupStatus:
    attempts: int = 0
    failures: int = 0
    last_error: str | None = None


#: A probe waits this long for a check to answer, then uses the check's last result: a slow or
#: hanging check must not make the proxy's probe (timeout 1 s) time out.
PROBE_WAIT_S = 0.5


@dataclass(slots=True)
class _Check:
    name: str
    fn: ReadinessCheck
    timeout_s: float
    cache_s: float
    result: dict[str, Any] | None = None
    at: float = 0.0
    task: asyncio.Task[dict[str, Any]] | None = None
    started: float = 0.0
    #: An attempt that overran its timeout and ignored its cancellation, left to itself.
    stuck: asyncio.Task[dict[str, Any]] | None = None


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
        # Metrics asked for without the extra: one ConfigError now, at the app's import.
        self.settings.require_metrics_extra()
        self.state = state if state is not None else ShutdownState()
        self.started_wall = time.time()
        self.started_monotonic = time.monotonic()
        self._checks: list[_Check] = []
        self.heartbeat = Heartbeat(self.settings.liveness_stall_ms)
        self._hooks: list[_Hook] = []
        self._startup: list[tuple[str, StartupTask]] = []
        self._startup_pending: dict[str, _StartupStatus] = {}
        self._startup_tasks: set[asyncio.Task[None]] = set()
        #: Monotonic deadline for shutdown work; set by the runner at SIGTERM.
        self.deadline: float | None = None
        #: Names of hooks that did not finish within the budget (the runner's exit code reads it).
        self.unfinished: list[str] = []
        #: Names of hooks that raised (any exception, `BaseException` included).
        self.failed: list[str] = []
        self._started = False
        self._shut_down = False
        #: Counters for `sf_lifecycle.metrics` (plain ints, updated where things happen).
        self.stats = Stats()
        #: (server, thread) of the metrics port (`metrics_port`), from start-up to stopped.
        self._metrics_server: tuple[Any, Any] | None = None

    # -- registration ----------------------------------------------------------------------
    def add_readiness_check(
        self, name: str, check: ReadinessCheck, *, timeout_s: float = 2.0, cache_s: float = 1.0
    ) -> None:
        """Register an async check that gates traffic: `/api/healthz` (what the proxy probes)
        and `/api/ready` answer 503 while it fails.

        A check fails when it raises (`NotReady` for a clean reason), returns False, or takes
        longer than `timeout_s`. Probes come every 2 s from each proxy and the kubelet: a result
        is reused for `cache_s`, a probe waits at most `PROBE_WAIT_S` (0.5 s) for a fresh one
        and otherwise answers with the last result, and a check still running `timeout_s` +
        0.5 s after it began (it ignores cancellation) counts as failing.
        """
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if cache_s < 0:
            raise ValueError("cache_s must not be negative")
        self._checks.append(_Check(name, check, timeout_s, cache_s))

    def on_shutdown(self, name: str, hook: ShutdownHook) -> None:
        """Register work to run once requests are finished, e.g. the final queue drain.

        Hooks run in registration order, each isolated from the others: a hook that raises
        (anything, `CancelledError`, `SystemExit` and `KeyboardInterrupt` included) is logged and
        reported in `failed`, and the later hooks still run. So that one stuck hook cannot
        starve the ones after it (the final queue drain above all), a hook followed by others
        gets at most half of the budget left when it starts; the last gets all of it. A hook
        receives a monotonic deadline 50 ms (at most a quarter of the share) before its share
        ends: time to give up by itself; still running when the share ends, it is cancelled.
        The budget is a ceiling: no hook runs past the shutdown's deadline. A hook that finished
        after the deadline it received, gave up (`BudgetExceeded`) or was cancelled is reported
        in `unfinished` with an error line saying which (naming what it left undone, for a
        `BudgetExceeded`).
        """
        self._hooks.append(_Hook(name, hook))

    def on_startup(self, name: str, task: StartupTask) -> None:
        """Register background start-up work (orphan recovery): ready is 503 until it finishes."""
        self._startup.append((name, task))

    # -- readiness -------------------------------------------------------------------------
    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether a request routed here now could fail for a reason of this replica's own.

        Not ready while starting or draining, while start-up work (the queue's orphan
        recovery, during which keyed feedback answers 503 "recovering") has not succeeded, and
        while a readiness check fails. `/api/healthz` (the proxy's probe) and `/api/ready` both
        answer from this. Returns (ready, body); the body's `reasons` lists every cause.
        """
        phase = self.state.phase
        body: dict[str, Any] = {"phase": str(phase)}
        if phase is not Phase.READY:
            body["reason"] = f"replica is {phase}"
            body["reasons"] = [body["reason"]]
            return False, body
        reasons: list[str] = []
        if self._startup_pending:
            reasons = []
            for n, st in sorted(self._startup_pending.items()):
                if st.last_error is None:
                    reasons.append(f"{n} running")
                else:
                    reasons.append(
                        f"{n} failed {st.failures} time(s), retrying; last error: {st.last_error}"
                    )
            body["reason"] = "; ".join(reasons)
            reasons = [f"start-up: {r}" for r in reasons]
            body["startup"] = {
                n: {"attempts": st.attempts, "failures": st.failures, "last_error": st.last_error}
                for n, st in sorted(self._startup_pending.items())
            }
        results = await asyncio.gather(*(self._cached_check(c) for c in self._checks))
        checks = dict(zip((c.name for c in self._checks), results, strict=True))
        if checks:
            body["checks"] = checks
        failed = [n for n, r in checks.items() if not r["ok"]]
        if failed:
            body.setdefault("reason", "failing checks: " + ", ".join(failed))
            reasons.append("failing checks: " + ", ".join(failed))
        if reasons:
            body["reasons"] = reasons
        return not reasons, body

    async def _cached_check(self, check: _Check) -> dict[str, Any]:
        """The check's result, fresh within `cache_s`; never waits more than `PROBE_WAIT_S`.

        An attempt still running `timeout_s` + `PROBE_WAIT_S` after it began ignores its
        cancellation: it counts as failing and is set aside, and the next probe starts a new
        attempt, so the check recovers with its dependency. At most one attempt per check is
        set aside; each probe cancels it again (a check that swallows one cancellation and
        retries may end at the next), and until it ends no other is set aside.
        """
        now = time.monotonic()
        if check.result is not None and now - check.at < check.cache_s:
            return check.result
        if check.stuck is not None and not check.stuck.done():
            check.stuck.cancel()
        overran = {
            "ok": False,
            "reason": f"did not finish in {check.timeout_s:g} s (ignores cancellation)",
        }
        if (
            check.task is not None
            and not check.task.done()
            and now - check.started > check.timeout_s + PROBE_WAIT_S
            and (check.stuck is None or check.stuck.done())
        ):
            if check.stuck is None:
                logger.warning(
                    "readiness check %s ignored its cancellation after %g s; left running, "
                    "a new attempt starts (one such attempt at most)",
                    check.name,
                    check.timeout_s,
                )
            check.stuck, check.task = check.task, None
            check.result, check.at = overran, now
        if check.task is None or check.task.done():
            check.started = now
            check.task = asyncio.create_task(self._refresh(check), name=f"sf-check-{check.name}")
        task = check.task
        try:
            return await asyncio.wait_for(asyncio.shield(task), PROBE_WAIT_S)
        except TimeoutError:
            if time.monotonic() - check.started > check.timeout_s + PROBE_WAIT_S:
                return overran
            if check.result is None:
                return {"ok": False, "reason": "first run still in progress"}
            return check.result

    async def _refresh(self, check: _Check) -> dict[str, Any]:
        result = await self._run_check(check)
        if check.task is asyncio.current_task():  # not an abandoned attempt's late answer
            check.result, check.at = result, time.monotonic()
        return result

    async def _run_check(self, check: _Check) -> dict[str, Any]:
        try:
            async with asyncio.timeout(check.timeout_s):
                result = await check.fn()
        except NotReady as exc:
            return {"ok": False, "reason": exc.reason}
        except TimeoutError:
            return {"ok": False, "reason": f"timed out after {check.timeout_s:g} s"}
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this attempt itself is cancelled (the loop is closing)
            # The check awaited something another task cancelled: a failing check.
            logger.warning("readiness check %s raised %r", check.name, exc)
            return {"ok": False, "reason": describe_error(exc)}
        except Exception as exc:
            logger.warning("readiness check %s raised %r", check.name, exc)
            return {"ok": False, "reason": describe_error(exc)}
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
        # Under a server that configures only its own loggers (plain uvicorn, gunicorn,
        # hypercorn) the drain's log lines would be dropped: give them a handler (`_logging`).
        ensure_logging(self.settings.log_format)
        if self.settings.metrics_port is not None and self._metrics_server is None:
            self._start_metrics_port(self.settings.metrics_port)
        self.heartbeat.start()
        for name, task in self._startup:
            self._startup_pending[name] = _StartupStatus()
            t = asyncio.create_task(self._run_startup(name, task), name=f"sf-startup-{name}")
            self._startup_tasks.add(t)
            t.add_done_callback(self._startup_tasks.discard)
        if self.state.mark_ready():
            logger.info("ready after %.0f ms", (time.monotonic() - self.started_monotonic) * 1000)

    def _start_metrics_port(self, port: int) -> None:
        """Serve metrics on `port`; a port already bound is one warning, not a failed start.

        Every worker of a gunicorn master reads the same environment, so with `SF_METRICS_PORT`
        set the second worker finds the port taken by the first: failing its start-up would
        make the master exit and take the whole service down. That worker serves without the
        port (README, "Metrics": use `SF_METRICS_PATH` with several workers). `sf-lifecycle
        serve`, one process per replica, refuses a port in use before it starts.
        """
        self.settings.require_metrics_extra()
        from .metrics import start_metrics_server  # the `metrics` extra

        try:
            self._metrics_server = start_metrics_server(self, port, self.settings.host)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            source = self.settings.sources().get("metrics_port", "SF_METRICS_PORT")
            logger.warning(
                "metrics port %s:%d is already in use (another worker of this app, or another "
                "process); this process serves no metrics port (set by %s). With several "
                "workers, use SF_METRICS_PATH instead",
                self.settings.host,
                port,
                source,
            )

    async def _run_startup(self, name: str, task: StartupTask) -> None:
        """Run `task` until it succeeds, retrying with capped exponential backoff and jitter.

        A failure is never final while the process lives: a sink down at start-up would
        otherwise leave orphans on disk until the next restart. A failure is anything the task
        raises, `BaseException` included, except a cancellation of this task (`_background`):
        a `CancelledError` or `SystemExit` out of a sink must not end the retries silently nor
        the process. Retries stop once the replica drains (the shutdown cancels this task).
        The task stays pending (readiness 503) until it succeeded.
        """
        began = time.monotonic()
        status = self._startup_pending[name]
        pause = STARTUP_RETRY_FIRST_S
        while True:
            status.attempts += 1
            try:
                await task()
            except BaseException as exc:
                if stops_task(exc):
                    raise
                status.failures += 1
                self.stats.startup_retries += 1
                status.last_error = describe_error(exc)
                if self.state.phase >= Phase.DRAINING:
                    logger.error(
                        "start-up task %s failed (attempt %d) while shutting down; not retried: %s",
                        name,
                        status.attempts,
                        status.last_error,
                    )
                    return
                wait = pause * random.uniform(0.8, 1.2)
                logger.warning(
                    "start-up task %s failed (attempt %d); retrying in %.0f ms",
                    name,
                    status.attempts,
                    wait * 1000,
                    exc_info=True,
                )
                await asyncio.sleep(wait)
                pause = min(pause * 2, STARTUP_RETRY_MAX_S)
            else:
                logger.info(
                    "start-up task %s done in %.0f ms%s",
                    name,
                    (time.monotonic() - began) * 1e3,
                    f" (attempt {status.attempts})" if status.attempts > 1 else "",
                )
                self._startup_pending.pop(name, None)
                return

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
        hooks = list(self._hooks)
        self.stats.hooks_began = time.monotonic()
        try:
            await self._run_hooks(hooks)
        finally:
            self.stats.hooks_ended = time.monotonic()
        await self.heartbeat.stop()
        self.state.mark_stopped()
        if self._metrics_server is not None:
            # Served through the hooks, so a scrape sees the final drain; stopped once done.
            server, self._metrics_server = self._metrics_server[0], None
            await asyncio.to_thread(server.shutdown)
            server.server_close()

    async def _run_hooks(self, hooks: list[_Hook]) -> None:
        assert self.deadline is not None
        for i, hook in enumerate(hooks):
            began = time.monotonic()
            remaining = self.deadline - began
            if remaining <= 0:
                self.unfinished.append(hook.name)
                logger.error("grace budget spent: shutdown hook %s not run", hook.name)
                continue
            share = remaining / 2 if i < len(hooks) - 1 else remaining
            # The time to give up comes out of the share: the hook's deadline is before the
            # share's end, which is never past the shutdown's deadline.
            hook_deadline = began + share - min(_HOOK_GIVE_UP_S, share / 4)
            # Each hook runs in a task of its own, so that a hook which ignores cancellation
            # can be abandoned and the ones after it still run.
            task = asyncio.create_task(
                _guarded(hook.fn, hook_deadline), name=f"sf-hook-{hook.name}"
            )
            try:
                done, _ = await asyncio.wait(
                    {task}, timeout=max(0.0, began + share - time.monotonic())
                )
                if not done:
                    task.cancel()
                    grace = min(_HOOK_CANCEL_GRACE_S, max(0.0, self.deadline - time.monotonic()))
                    done, _ = await asyncio.wait({task}, timeout=grace)
            except asyncio.CancelledError:
                # The shutdown itself is being cancelled (the loop is closing), not by a hook.
                task.cancel()
                self.unfinished.extend(h.name for h in hooks[i:])
                logger.error(
                    "shutdown cancelled during hook %s; not run: %s",
                    hook.name,
                    ", ".join(h.name for h in hooks[i + 1 :]) or "none",
                )
                raise
            elapsed_ms = (time.monotonic() - began) * 1000
            if not done:
                self.unfinished.append(hook.name)
                logger.error(
                    "grace budget exceeded: shutdown hook %s cancelled after %.0f ms and still "
                    "running (it ignores cancellation); abandoned",
                    hook.name,
                    elapsed_ms,
                )
                continue
            if task.cancelled():
                self.unfinished.append(hook.name)
                logger.error(
                    "grace budget exceeded: shutdown hook %s cancelled after %.0f ms",
                    hook.name,
                    elapsed_ms,
                )
                continue
            exc, ended = task.result()
            late_ms = (ended - hook_deadline) * 1000
            if exc is None and late_ms > 0:
                # Its work is done, but the budget it was given was overrun: say so.
                self.unfinished.append(hook.name)
                logger.error(
                    "grace budget exceeded: shutdown hook %s finished after %.0f ms, %.0f ms "
                    "past its deadline",
                    hook.name,
                    elapsed_ms,
                    late_ms,
                )
            elif exc is None:
                logger.info("shutdown hook %s done in %.0f ms", hook.name, elapsed_ms)
            elif isinstance(exc, BudgetExceeded):
                # The hook gave up by itself (at its deadline, or when told to stop): say what
                # it left undone, not that it was cancelled.
                self.unfinished.append(hook.name)
                logger.error(
                    "grace budget exceeded: shutdown hook %s gave up after %.0f ms: %s",
                    hook.name,
                    elapsed_ms,
                    exc,
                )
            else:
                self.failed.append(hook.name)
                logger.error(
                    "shutdown hook %s failed after %.0f ms; the remaining hooks still run",
                    hook.name,
                    elapsed_ms,
                    exc_info=exc,
                )

    # -- wiring ----------------------------------------------------------------------------
    def install(self, app: _AppT) -> _AppT:
        """Wire this lifecycle into a Starlette (or FastAPI) app and return it.

        Adds the in-flight middleware, which also answers `/api/healthz`, `/api/ready` and
        `/api/version`, and wraps the app's lifespan so hooks run on shutdown. The runner finds
        the lifecycle again through `app.state.sf_lifecycle`.
        """
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
