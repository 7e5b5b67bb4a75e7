"""A user's app as a real server process, with deterministic kills, restarts and timelines.

`Service` wraps `ServerProcess` (which starts `sf-lifecycle serve` on a free 127.0.0.1 port and
reaps it by PID) with what a kill-mid-drain test needs:

- `kill_during_drain()` / `kill_after_append()` / `kill_at(point)`: arm one of the library's
  crash points in the running process (`_armed`), then trigger it (SIGTERM starts the final drain;
  the next POST is the next append). The process SIGKILLs itself at that exact step: no sleep,
  no race with a fast drain, and the kill is verified (exit by SIGKILL, crash-point line logged).
- `terminate_and_wait()`: SIGTERM while probing the health route the way a proxy does, then the
  exit code and the `Timeline` parsed from the log.
- `restart()`: a new process on the same state directory, ready only once start-up recovery of
  the dead process's queue has finished (`<SF_HEALTH_PREFIX>/ready`, `/api/ready` by default,
  answers 200).

The pytest fixture `sf_service` (plugin.py) creates these and reaps them after each test.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .._crashpoints import POINTS
from .._errors import SfLifecycleError
from ._armed import ARMED_LINE
from .process import ServerProcess
from .timeline import Timeline, parse_timeline

__all__ = ["CrashPointMissed", "Service", "ServiceFactory", "Shutdown"]

_JSON = {"content-type": "application/json"}
_CRASH_LINE = "sf-crashpoint: SIGKILL at "


class CrashPointMissed(SfLifecycleError, AssertionError):
    """The process did not die at the armed crash point (it exited otherwise, or not at all).

    Usually nothing reached the point: no record was queued when the drain ran (the background
    drainer had delivered everything; raise `SF_DRAIN_INTERVAL_MS`), or the app does not use
    `FeedbackQueue`. The message holds the exit code and the server log.
    """


@dataclass(frozen=True, slots=True)
class Shutdown:
    """How a process ended.

    Attributes:
        exit_code: The process exit code; negative when killed by that signal (-9: SIGKILL).
        timeline: Phase changes parsed from its log, relative to the signal.
        elapsed_s: Seconds from sending the signal (or arming) to the exit, seen by the test.
    """

    exit_code: int
    timeline: Timeline
    elapsed_s: float


class Service:
    """One server process of the app under test. Create it with the `sf_service` fixture.

    Args:
        app: `module:attribute` of the ASGI app (importable from `cwd`).
        state_dir: The state directory; shared by `restart()`ed processes. It replaces an
            inherited `SF_STATE_DIR`.
        env: Extra environment variables (`SF_*` settings, app switches), over everything.
            The child inherits the rest of this process's environment, other `SF_*` included.
        cwd: Working directory of the process.
        drain_delay_ms: `SF_DRAIN_DELAY_MS` unless `env` sets it, replacing an inherited one
            (short by default, so shutdown tests stay fast whatever the shell exports); None
            leaves the inherited variable or the library default.
        reap_s: Seconds between SIGTERM and SIGKILL when the test ends with it still running.
        ready_timeout_s: How long `start()` and `restart()` wait for `<prefix>/ready`.
    """

    def __init__(
        self,
        app: str,
        *,
        state_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        drain_delay_ms: int | None = 200,
        reap_s: float = 10.0,
        ready_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self.state_dir = Path(state_dir)
        self.user_env = dict(env or {})
        self.cwd = cwd or Path.cwd()
        self.drain_delay_ms = drain_delay_ms
        self.reap_s = reap_s
        self.ready_timeout_s = ready_timeout_s
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd, arm_file = tempfile.mkstemp(prefix="sf-testing-arm-")
        os.close(fd)
        self._arm_file = Path(arm_file)
        child_env = {
            **self.user_env,
            "SF_TESTING_APP": app,
            "SF_TESTING_ARM_FILE": str(self._arm_file),
        }
        if drain_delay_ms is not None:
            child_env.setdefault("SF_DRAIN_DELAY_MS", str(drain_delay_ms))
        self.process = ServerProcess(
            "sf_lifecycle.testing._armed:app",
            state_dir=self.state_dir,
            env=child_env,
            cwd=self.cwd,
            reap_s=reap_s,
        )
        self.shutdown: Shutdown | None = None
        self._log_copy: str | None = None
        #: Where `restart()` registers the new process so the fixture reaps it too.
        self._registry: list[Service] | None = None

    # -- identity ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:41234`."""
        return self.process.url

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        proc = self.process.proc
        return proc is not None and proc.poll() is None

    def logs(self) -> str:
        """The process's stdout and stderr so far (kept after `close()`)."""
        if self._log_copy is not None:
            return self._log_copy
        return self.process.logs()

    def __repr__(self) -> str:
        proc = self.process.proc
        pid = proc.pid if proc is not None else None
        return f"<Service {self.app} pid={pid} {self.url} state_dir={self.state_dir}>"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, *, wait_ready: bool = True) -> Service:
        """Start the process and (by default) wait until `/api/ready` answers 200."""
        self.process.start()
        if wait_ready:
            self.process.wait_ready(self.ready_timeout_s)
        return self

    def restart(self, *, env: Mapping[str, str] | None = None, wait_ready: bool = True) -> Service:
        """Start the next process on the same state directory and wait for its recovery.

        This is what the next container does: a new process of the same app, on the same
        volume, ready only once start-up recovery has finished (`/api/ready` 200). The old
        process may still be running (a rolling upgrade) or be dead (a crash). The new one gets
        a new port and no armed crash point, and is reaped by the same fixture.

        Args:
            env: Replaces this service's extra environment when given.
            wait_ready: Wait for `/api/ready` (recovery of the dead process's queue done).
        """
        new = Service(
            self.app,
            state_dir=self.state_dir,
            env=self.user_env if env is None else env,
            cwd=self.cwd,
            drain_delay_ms=self.drain_delay_ms,
            reap_s=self.reap_s,
            ready_timeout_s=self.ready_timeout_s,
        )
        if self._registry is not None:
            self._registry.append(new)
            new._registry = self._registry
        return new.start(wait_ready=wait_ready)

    def close(self) -> None:
        """Reap the process (SIGTERM, SIGKILL after `reap_s`); idempotent, keeps the log."""
        if self._log_copy is None and self.process.proc is not None:
            with contextlib.suppress(OSError):
                self.process.stop()
                self._log_copy = self.process.logs()
        self.process.close()
        with contextlib.suppress(FileNotFoundError):
            self._arm_file.unlink()

    # -- requests ----------------------------------------------------------------------------
    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection: (status, lower-cased headers, body)."""
        body = None
        hdrs = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs = {**_JSON, **hdrs}
        return self.process.get(path, method=method, body=body, headers=hdrs, timeout=timeout)

    def post_json(
        self, path: str, payload: Any, *, headers: Mapping[str, str] | None = None
    ) -> Any:
        """POST `payload` as JSON and return the decoded answer; raise unless the status is 2xx.

        With the library's feedback route, `post_json("/api/feedback", {...})["id"]` is the id
        of a write the server has acknowledged (durable): collect these for the oracle.
        """
        status, _, body = self.request(path, method="POST", json_body=payload, headers=headers)
        if not 200 <= status < 300:
            raise AssertionError(f"POST {path} answered {status}: {body[:500]!r}")
        return json.loads(body)

    # -- signals -----------------------------------------------------------------------------
    def arm(self, point: str, *, timeout: float = 5.0) -> None:
        """Arm crash point `point` (`name` or `name:N`) in the running process.

        The process SIGKILLs itself the N-th time it passes the point from now on. Returns once
        the process confirmed it (so whatever the test does next is covered).

        Raises:
            ValueError: `point` is not a crash point the library declares.
            CrashPointMissed: the process exited or did not confirm in time.
        """
        name, _, count = point.partition(":")
        if name not in POINTS:
            raise ValueError(f"unknown crash point {point!r}; known: {sorted(POINTS)}")
        if count and not (count.isdigit() and int(count) >= 1):
            raise ValueError(f"crash point {point!r}: N in name:N must be a positive integer")
        before = self.logs().count(ARMED_LINE)
        self._arm_file.write_text(point)
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while self.logs().count(ARMED_LINE) <= before:
            if not self.running or time.monotonic() > deadline:
                raise CrashPointMissed(
                    f"{self!r} did not confirm arming {point!r}:\n{self.logs()[-4000:]}"
                )
            time.sleep(0.005)

    def kill_at(self, point: str, trigger: Any = None, *, timeout: float = 30.0) -> Shutdown:
        """Arm `point`, run `trigger()` (when given), and wait for the process to die there.

        Args:
            point: A crash point, `name` or `name:N`.
            trigger: Called after arming; what makes the process reach the point.
            timeout: Seconds to wait for the exit.

        Raises:
            CrashPointMissed: the process exited another way, or is still running at `timeout`.
        """
        self.arm(point)
        began = time.monotonic()
        if trigger is not None:
            # A request cut by the SIGKILL ends in a reset or a truncated answer: expected.
            with contextlib.suppress(ConnectionError, http.client.HTTPException):
                trigger()
        return self._expect_crash(point.partition(":")[0], began, timeout)

    def kill_during_drain(
        self, point: str = "drain.after_rename", *, timeout: float = 30.0
    ) -> Shutdown:
        """SIGTERM, and SIGKILL at `point` of the final drain: a container killed mid-drain.

        With the default point the queued records were just renamed to `.draining` and none
        was delivered; `drain.after_sink_commit` dies after the first batch committed;
        `drain.before_unlink` after the sink got everything but before the file was removed
        (so the next start delivers it again: a test of the sink's idempotency).

        Records must still be queued when the drain runs: start the service with a long
        `SF_DRAIN_INTERVAL_MS` so the background drainer does not deliver them first.
        """
        return self.kill_at(
            point, lambda: self.process.send_signal(signal.SIGTERM), timeout=timeout
        )

    def kill_after_append(
        self,
        path: str = "/api/feedback",
        payload: Any = None,
        *,
        point: str = "append.after_fsync",
        timeout: float = 30.0,
    ) -> Shutdown:
        """POST one write and SIGKILL the server once it is durable but before it answers.

        The client sees the connection reset, so the write is *not* acknowledged, yet it is on
        disk and will be delivered: pass `unacknowledged=1` to the oracle for it. Use
        `point="append.after_write"` to die before the fsync instead (the write may be lost,
        which is allowed: it was never acknowledged).
        """
        body = {"sf_testing": "in flight at the kill"} if payload is None else payload

        def post() -> None:
            status, _, answer = self.request(path, method="POST", json_body=body)
            raise CrashPointMissed(
                f"POST {path} was answered ({status} {answer[:200]!r}) instead of killing the "
                f"server at {point}: the route did not append to the queue\n{self.logs()[-4000:]}"
            )

        return self.kill_at(point, post, timeout=timeout)

    def terminate_and_wait(self, *, timeout: float = 60.0, probe_path: str | None = "") -> Shutdown:
        """SIGTERM and wait for the exit, probing `probe_path` every 50 ms like a proxy would.

        Returns:
            The exit code (0: clean; 4: grace budget exceeded) and the timeline, in which the
            probes make `first_503` appear. `probe_path` defaults to `<SF_HEALTH_PREFIX>/healthz`
            of the child's environment; pass None to send no probe.
        """
        if probe_path == "":
            probe_path = self.process.health_path("healthz")
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        probing = probe_path is not None
        while self.running and time.monotonic() - began < timeout:
            if probing:
                try:
                    self.process.get(probe_path or "", timeout=1.0)
                except OSError:
                    probing = False  # listeners closed; nothing more to see from outside
            time.sleep(0.05)
        code = self._wait(began, timeout)
        return self._finish(code, began)

    # -- internals ---------------------------------------------------------------------------
    def _wait(self, began: float, timeout: float) -> int:
        try:
            return self.process.wait(max(0.0, timeout - (time.monotonic() - began)))
        except subprocess.TimeoutExpired:
            raise CrashPointMissed(
                f"{self!r} still running {timeout:.0f} s after the signal:\n{self.logs()[-4000:]}"
            ) from None

    def _finish(self, code: int, began: float) -> Shutdown:
        self.shutdown = Shutdown(code, parse_timeline(self.logs()), time.monotonic() - began)
        return self.shutdown

    def _expect_crash(self, name: str, began: float, timeout: float) -> Shutdown:
        code = self._wait(began, timeout)
        result = self._finish(code, began)
        if code != -signal.SIGKILL or f"{_CRASH_LINE}{name}" not in self.logs():
            raise CrashPointMissed(
                f"{self!r} was to die at crash point {name} but exited with {code}; did a write "
                f"reach it? (records queued when the drain ran: set SF_DRAIN_INTERVAL_MS high "
                f"so the background drainer leaves them for the final drain)\n"
                f"{self.logs()[-4000:]}"
            )
        return result


class ServiceFactory(Protocol):
    """The type of the `sf_service` fixture, for annotating tests (`sf_service: ServiceFactory`)."""

    def __call__(
        self,
        app: str,
        *,
        state_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        drain_delay_ms: int | None = 200,
        start: bool = True,
    ) -> Service: ...
