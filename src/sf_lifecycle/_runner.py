"""Run an ASGI app under uvicorn with a drain-aware SIGTERM.

Plain uvicorn closes its listening socket within about 0.1 s of SIGTERM, while the proxy keeps
routing to it until its next health probe: every request in that window fails with 502. This
runner changes the order:

1. SIGTERM: the phase becomes `draining`, so `/api/healthz` answers 503 at once.
2. The server keeps accepting and serving for the drain delay (`SF_DRAIN_DELAY_MS`), or until
   `SF_DRAIN_MARGIN_MS` after the N-th 503 probe (`SF_DRAIN_AFTER_PROBES`).
3. Listeners close, open streams are told to end, in-flight requests finish, and the lifespan
   shutdown runs the shutdown hooks (the queue drain), all within `SF_RPC_SHUTDOWN_GRACE_MS` of
   the signal.
4. Exit 0, `ExitCode.BUDGET_EXCEEDED` when the budget ran out (what was undone is logged), or
   `ExitCode.HOOK_FAILED` when a shutdown hook raised.

SIGINT does the same without the drain delay (a person at a terminal wants it gone); a second
SIGINT exits at once with `ExitCode.FORCED`. A repeated SIGTERM is logged and ignored: orchestrators
resend it, and restarting the drain would only delay the exit. Under the CLI these handlers stay
installed until the process is gone, through asyncio's and the interpreter's teardown.

A signal before the server listens (the application's start-up still running) has nothing to
drain: nothing was accepted. The start-up is abandoned and the process exits at once with
`ExitCode.STARTUP_FAILED`, as when the start-up fails.

The budget is a hard ceiling on the process's life, not a hope: from the first signal a
watchdog thread (`_watchdog`) ends the process at the deadline plus `HARD_SLACK_S`, whatever
holds it (a sink blocking the loop, a thread the interpreter would join at exit, a hook that
ignores cancellation). Once the exit code is decided, teardown gets at most `TEARDOWN_S` more.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import socket
import threading
import time
from collections.abc import Generator
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.lifespan.on import LifespanOn

from ._config import Settings
from ._health import route_path
from ._lifecycle import Lifecycle
from ._middleware import LifecycleMiddleware
from ._problem import problem
from ._state import Phase
from ._watchdog import Watchdog

__all__ = [
    "ExitCode",
    "LifecycleServer",
    "serve",
]

logger = logging.getLogger("sf_lifecycle.runner")


class ExitCode(enum.IntEnum):
    """Exit codes of `serve` and of `sf-lifecycle serve`; ints, so `sys.exit(code)` works."""

    OK = 0
    #: Invalid configuration (an `SF_*` variable, a flag, the state directory): the message
    #: names what to change; nothing was started.
    CONFIG_ERROR = 2
    #: The server never listened: the application's start-up failed, its port could not be
    #: bound, or SIGTERM/SIGINT came before the start-up finished (nothing was accepted,
    #: nothing to drain).
    STARTUP_FAILED = 3
    #: The grace budget ran out before in-flight requests or shutdown hooks finished.
    BUDGET_EXCEEDED = 4
    #: A shutdown hook raised (any exception, `CancelledError` and `SystemExit` included); the
    #: later hooks still ran. Budget exceeded wins when both happened.
    HOOK_FAILED = 5
    #: `sf-lifecycle serve MODULE:APP` (or `queue recover --app`) could not import the app:
    #: no such module or attribute, not callable, or the import raised (one line says which;
    #: `serve --debug` prints the traceback).
    APP_NOT_LOADED = 6
    #: A second SIGINT cut the shutdown short (128 + SIGINT, as shells report it).
    FORCED = 130


#: The watchdog ends the process this long after the grace deadline if it is still alive.
HARD_SLACK_S = 0.3
#: Once the exit code is decided, the rest (asyncio and interpreter teardown, joining threads
#: a sink or hook left running) gets this long, never past the deadline plus `HARD_SLACK_S`.
TEARDOWN_S = 2.0
#: uvicorn pauses this long after asking connections to close, before its graceful timeout
#: starts (`uvicorn.Server.shutdown`); taken off the timeout so requests are cut at the deadline.
_UVICORN_CLOSE_PAUSE_S = 0.1


class _Demoted(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Logs everything at debug level (what an abandoned start-up says as it is cancelled)."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


class LifecycleServer(uvicorn.Server):
    """A `uvicorn.Server` whose signal handling drains before it closes the listeners."""

    def __init__(
        self,
        config: uvicorn.Config,
        lifecycle: Lifecycle,
        watchdog: Watchdog | None = None,
        *,
        hold_signals: bool = False,
    ) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.exit_code = ExitCode.OK
        self.watchdog = watchdog
        #: Keep SIGTERM/SIGINT handled after serving (the process ends right after `run`).
        self.hold_signals = hold_signals
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signal_at: float | None = None
        self._first_signal_at: float | None = None
        self._skip_delay = False
        self._interrupts = 0
        #: The task running the start-up, while it runs (a signal then cancels it).
        self._starting: asyncio.Task[Any] | None = None
        self._startup_interrupted = False

    # -- signals ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._loop = asyncio.get_running_loop()
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            if self.hold_signals:
                # What is left (cancelling tasks, joining the executor's threads, the
                # interpreter joining threads a sink left) is bounded by the watchdog; the
                # default handlers would let a resent SIGTERM kill the process by signal, or a
                # SIGINT raise KeyboardInterrupt into the teardown and exit 0.
                self._bound_teardown()
                for sig in handled:
                    signal.signal(sig, self._signal_after_serving)
            else:
                for sig, handler in original.items():
                    signal.signal(sig, handler)
        # Unlike uvicorn, the captured signal is not raised again on the way out: the process
        # exits with a code that says how the shutdown went.

    def _signal_after_serving(self, sig: int, frame: FrameType | None) -> None:
        # The loop is gone or going: touch only the watchdog (lock-free). The exit code is
        # decided and the watchdog bounds the rest; only a second SIGINT changes it.
        if sig == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts >= 2 and self.watchdog is not None:
                self.watchdog.arm(
                    time.monotonic(),
                    ExitCode.FORCED,
                    "second SIGINT: exiting now, without waiting for the rest of the teardown",
                )

    def _bound_teardown(self) -> None:
        """The exit code is decided: the rest gets `TEARDOWN_S`, never more than planned."""
        if self.watchdog is None:
            return
        plan = self.watchdog.plan
        if plan is not None and plan[1] == ExitCode.FORCED:
            return  # a second SIGINT: already at once
        at = time.monotonic() + TEARDOWN_S
        self.watchdog.arm(
            at if plan is None else min(at, plan[0]),
            self.exit_code,
            f"exit {self.exit_code} decided but the process did not end (a thread a sink "
            "or hook started is still running); not waiting for it",
        )

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread, possibly while the loop holds a lock
        # or is blocked: take no lock here. Arm the watchdog (lock-free) so the budget and a
        # second SIGINT hold even if the loop never runs `_on_signal`, then hand it the rest.
        now = time.monotonic()
        if sig == signal.SIGINT:
            self._interrupts += 1
        wd = self.watchdog
        if self._first_signal_at is None:
            self._first_signal_at = now
            if wd is not None and not self.started:
                # Nothing served yet: the start-up is abandoned (`_on_signal`); should the loop
                # be blocked in it, the process ends anyway, shortly.
                wd.arm(
                    now + TEARDOWN_S,
                    ExitCode.STARTUP_FAILED,
                    f"{signal.Signals(sig).name} during start-up and the start-up did not stop "
                    "(a blocked loop?); nothing was served",
                )
            elif wd is not None:
                wd.arm(
                    now + self.lifecycle.settings.grace_ms / 1000 + HARD_SLACK_S,
                    ExitCode.BUDGET_EXCEEDED,
                    f"grace budget of {self.lifecycle.settings.grace_ms} ms exceeded and the "
                    "shutdown did not finish (a blocked loop, a stuck hook or sink); unfinished "
                    "work stays on disk for the next start",
                )
        elif sig == signal.SIGINT and self._interrupts >= 2:
            self.exit_code = ExitCode.FORCED
            self.force_exit = True
            if wd is not None:
                wd.arm(
                    now,
                    ExitCode.FORCED,
                    "second SIGINT: exiting now; in-flight work and hooks are abandoned "
                    "(acknowledged records are on disk for the next start)",
                )
        if self._loop is None:
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._on_signal, signal.Signals(sig), now)

    def _on_signal(self, sig: signal.Signals, now: float) -> None:
        if self._signal_at is None and not self.started and self._starting is not None:
            self._interrupt_startup(sig, now)
            return
        if self._startup_interrupted:
            return  # the start-up is being abandoned; the watchdog bounds it
        if self._signal_at is not None:
            if sig == signal.SIGINT and self._interrupts >= 2:
                # The watchdog exits at once; without one (not the main thread) stop uvicorn.
                self.should_exit = True
            elif sig == signal.SIGINT:
                logger.info("SIGINT during drain: skipping the rest of the drain delay")
                self._skip_delay = True
            else:
                logger.info("%s again: ignored, shutdown already under way", sig.name)
            return
        self._signal_at = now
        self._skip_delay = sig == signal.SIGINT
        settings = self.lifecycle.settings
        wd = self.watchdog
        if wd is not None and wd.plan is not None and wd.plan[1] == ExitCode.STARTUP_FAILED:
            # The handler saw the start-up running, but it finished meanwhile: a full drain.
            wd.arm(
                now + settings.grace_ms / 1000 + HARD_SLACK_S,
                ExitCode.BUDGET_EXCEEDED,
                f"grace budget of {settings.grace_ms} ms exceeded and the shutdown did not finish",
            )
        self.lifecycle.deadline = now + settings.grace_ms / 1000
        self.lifecycle.state.begin_draining()
        if self._skip_delay:
            logger.info("received SIGINT: draining without delay (grace %d ms)", settings.grace_ms)
        else:
            logger.info(
                "received %s: draining; healthz answers 503, serving for up to %d ms%s "
                "(grace %d ms)",
                sig.name,
                settings.drain_delay_ms,
                f" or {settings.drain_margin_ms} ms after probe {settings.drain_after_probes}"
                if settings.drain_after_probes
                else "",
                settings.grace_ms,
            )

    def _interrupt_startup(self, sig: signal.Signals, now: float) -> None:
        """A signal while the application starts: nothing listens yet, so nothing was accepted
        and there is nothing to drain; waiting for a start-up that may hang (a database that
        does not answer) would only sit out the grace budget. Abandon it and exit 3."""
        assert self._starting is not None
        self._startup_interrupted = True
        self.exit_code = ExitCode.STARTUP_FAILED
        self.lifecycle.state.begin_draining()
        logger.warning(
            "received %s during start-up, %.0f ms after the process started: nothing was "
            "served yet, so nothing to drain; abandoning the start-up (exit %d)",
            sig.name,
            (now - self.lifecycle.started_monotonic) * 1000,
            ExitCode.STARTUP_FAILED,
        )
        if isinstance(self.lifespan, LifespanOn):
            # Its task is cancelled with the loop's other tasks: a start-up given up on, not
            # an error to log with a traceback (the line above says what happened).
            self.lifespan.startup_failed = True
            self.lifespan.logger = _Demoted(self.lifespan.logger, {})  # type: ignore[assignment]
        self._starting.cancel()

    # -- main loop -------------------------------------------------------------------------
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._starting = asyncio.current_task()
        try:
            await super().startup(sockets)
        except asyncio.CancelledError:
            if not self._startup_interrupted:
                raise
            if self._starting is not None:
                self._starting.uncancel()
            self.should_exit = True
            return
        except OSError as exc:
            # A Unix socket path it cannot bind (uvicorn handles TCP binds itself, below).
            logger.error(
                "start-up failed: could not listen (%s) (exit %d)", exc, ExitCode.STARTUP_FAILED
            )
            self.exit_code = ExitCode.STARTUP_FAILED
            self.should_exit = True
            return
        except SystemExit:
            # uvicorn calls `sys.exit()` when the application's start-up failed (3) or it cannot
            # bind (1); its error is logged above. Raised out of the loop, it skips the rest.
            logger.error(
                "%s (exit %d)",
                "the application's start-up failed"
                if self.lifespan.should_exit
                else "start-up failed: could not listen",
                ExitCode.STARTUP_FAILED,
            )
            self.exit_code = ExitCode.STARTUP_FAILED
            self.should_exit = True
            return
        finally:
            self._starting = None
        if not self.started:
            if self.exit_code == ExitCode.OK:
                self.exit_code = ExitCode.STARTUP_FAILED
                logger.error("the application's start-up failed (exit %d)", ExitCode.STARTUP_FAILED)
            return
        # An app that did not enter the lifecycle's lifespan (a bare ASGI app, wrapped by the
        # CLI) is made ready here, once the listeners are up.
        await self.lifecycle.startup()

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        return self._signal_at is not None and self._drain_delay_over()

    def _drain_delay_over(self) -> bool:
        assert self._signal_at is not None
        if self._skip_delay:
            return True
        settings = self.lifecycle.settings
        now = time.monotonic()
        if now - self._signal_at >= settings.drain_delay_ms / 1000:
            return True
        n = settings.drain_after_probes
        probes = self.lifecycle.state.probe_503_times
        return (
            n is not None
            and len(probes) >= n
            and now >= probes[n - 1] + settings.drain_margin_ms / 1000
        )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = self.lifecycle.state
        now = time.monotonic()
        if self.lifecycle.deadline is None:
            self.lifecycle.deadline = now + self.lifecycle.settings.grace_ms / 1000
        if self._signal_at is not None:
            logger.info(
                "drain delay over after %.0f ms (%d probe(s) answered 503); closing listeners, "
                "%d request(s) in flight",
                (now - self._signal_at) * 1000,
                state.probes_503,
                state.in_flight,
            )
        deadline = self.lifecycle.deadline
        if self.watchdog is not None and self.watchdog.plan is None:
            self.watchdog.arm(
                deadline + HARD_SLACK_S,
                ExitCode.BUDGET_EXCEEDED,
                f"grace budget of {self.lifecycle.settings.grace_ms} ms exceeded and the "
                "shutdown did not finish",
            )
        state.begin_draining()
        state.begin_closing()
        # uvicorn's graceful timeout is typed as whole seconds but handed to `asyncio.wait_for`,
        # which takes a float: pass the exact time left, so requests are cut at the deadline.
        self.config.timeout_graceful_shutdown = max(  # type: ignore[assignment]
            0.0, deadline - time.monotonic() - _UVICORN_CLOSE_PAUSE_S
        )
        await super().shutdown(sockets)
        if state.phase is not Phase.STOPPED and not self.force_exit:
            await self.lifecycle.shutdown()
        state.mark_stopped()
        if self.exit_code == ExitCode.OK and (
            self.lifecycle.unfinished or time.monotonic() > deadline
        ):
            self.exit_code = ExitCode.BUDGET_EXCEEDED
            logger.error(
                "grace budget of %d ms exceeded; unfinished: %s (left on disk for the next start)",
                self.lifecycle.settings.grace_ms,
                ", ".join(self.lifecycle.unfinished) or "in-flight requests",
            )
        elif self.exit_code == ExitCode.OK and self.lifecycle.failed:
            self.exit_code = ExitCode.HOOK_FAILED
            logger.error(
                "shutdown hook(s) failed: %s; the other hooks ran",
                ", ".join(self.lifecycle.failed),
            )
        logger.info(
            "exit %d, %.0f ms after the signal",
            self.exit_code,
            (time.monotonic() - (self._signal_at or now)) * 1000,
        )
        # The decision is made: what is left (asyncio's and the interpreter's teardown, which
        # join threads a sink or hook may have left blocked) gets a short bound.
        self._bound_teardown()


class _ConcurrencyLimit:
    """uvicorn's `limit_concurrency`, in front of the app but behind the health paths.

    uvicorn answers 503 itself, before any app sees the request, once that many connections
    and tasks are open: a busy replica's `/api/livez` would fail and the kubelet restart a
    healthy pod, and its healthz would flap. Here HTTP and WebSocket requests past the limit
    get 503 with `Retry-After`, and the health and metrics paths are always answered.

    A response that turns out to be an event stream (`text/event-stream`) gives its slot back
    when it starts: streams live for minutes and are not in flight for the drain either (the
    middleware reports them apart), so N idle streams must not refuse every write.
    """

    def __init__(self, app: Any, limit: int, exempt: frozenset[str]) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt
        self.active = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or route_path(scope) in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1013})
                return
            detail = f"more than {self.limit} requests at once (--limit-concurrency); retry"
            response = problem(503, "over_capacity", detail, retry_after_s=1, limit=self.limit)
            await response(scope, receive, send)
            return
        self.active += 1
        held = True

        async def send_wrapper(message: Any) -> None:
            nonlocal held
            if held and message["type"] == "http.response.start" and _is_stream(message):
                held = False
                self.active -= 1
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if held:
                self.active -= 1


def _is_stream(start: Any) -> bool:
    for name, value in start.get("headers", ()):
        if name.lower() == b"content-type":
            return bytes(value).lower().startswith(b"text/event-stream")
    return False


def serve(
    app: Any,
    *,
    lifecycle: Lifecycle | None = None,
    settings: Settings | None = None,
    host: str | None = None,
    port: int | None = None,
    sock: socket.socket | None = None,
    own_process: bool = False,
    **uvicorn_options: Any,
) -> ExitCode:
    """Serve `app` until SIGTERM or SIGINT, drain, and return the process exit code.

    Args:
        app: An ASGI app, or a `"module:attribute"` string.
        lifecycle: The app's lifecycle; found from the app (`Lifecycle.of`) when None. An app
            without one is wrapped with the health routes and the middleware.
        settings: Used to build a lifecycle when the app has none.
        host: Interface to bind; the settings' `host` when None.
        port: Port to bind; the settings' `port` when None.
        sock: An already bound socket to serve on instead of host and port.
        own_process: The caller exits right after this returns (the CLI): the budget then
            also bounds the interpreter's exit. From the first signal until this returns the
            process ends at the deadline (plus `HARD_SLACK_S`) whatever holds it.
        **uvicorn_options: Passed to `uvicorn.Config` (e.g. `log_config`, `access_log`);
            `limit_concurrency` is applied here instead, with the health paths exempt.
    """
    if isinstance(app, str):
        from uvicorn.importer import import_from_string

        app = import_from_string(app)
    lifecycle = lifecycle or Lifecycle.of(app)
    # An app built with a lifecycle must start cleanly; a bare app may not speak lifespan.
    uvicorn_options.setdefault("lifespan", "on" if lifecycle is not None else "auto")
    if lifecycle is None:
        lifecycle = Lifecycle(settings)
        app = LifecycleMiddleware(app, lifecycle)
    s = lifecycle.settings
    limit = uvicorn_options.pop("limit_concurrency", None)
    if limit is not None:
        prefix = s.health_prefix
        exempt = {f"{prefix}/{name}" for name in ("healthz", "ready", "livez", "version")}
        if s.metrics_path is not None:
            exempt.add(s.metrics_path)
        app = _ConcurrencyLimit(app, limit, frozenset(exempt))
    uvicorn_options.setdefault("access_log", s.access_log)
    # Which source each setting came from (flag, variable, code): the first question when a
    # value is not the one expected (precedence: `_config`).
    logger.info("settings: %s", s.describe_sources())
    config = uvicorn.Config(
        app,
        host=host if host is not None else s.host,
        port=port if port is not None else s.port,
        timeout_graceful_shutdown=s.grace_ms // 1000 + 1,  # replaced at shutdown
        **uvicorn_options,
    )
    watchdog = Watchdog()
    server = LifecycleServer(config, lifecycle, watchdog, hold_signals=own_process)
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        if not own_process:
            watchdog.close()
    # With `own_process` the watchdog stays armed through the interpreter's exit, which joins
    # every non-daemon thread: a thread blocked in a sink must not hold the process.
    return server.exit_code
