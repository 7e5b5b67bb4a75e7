"""The runner against real processes and real signals on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sf_lifecycle import ExitCode
from sf_lifecycle._runner import TEARDOWN_S
from sf_lifecycle.testing import ServerProcess

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server_factory() -> Iterator[type[ServerProcess]]:
    started: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def start(self) -> ServerProcess:
            started.append(self)
            return super().start()

    try:
        yield Tracked
    finally:
        for s in started:
            s.close()


class Background:
    """An HTTP request on its own thread, so a test can signal the server meanwhile."""

    def __init__(self, server: ServerProcess, path: str) -> None:
        self.result: tuple[int, dict[str, str], bytes] | BaseException | None = None
        self._t = threading.Thread(target=self._run, args=(server, path), daemon=True)
        self._t.start()

    def _run(self, server: ServerProcess, path: str) -> None:
        try:
            self.result = server.get(path, timeout=30)
        except BaseException as exc:
            self.result = exc

    def join(self, timeout: float) -> tuple[int, dict[str, str], bytes]:
        self._t.join(timeout)
        assert not self._t.is_alive(), "request did not finish"
        assert isinstance(self.result, tuple), self.result
        return self.result


def wait_in_flight(server: ServerProcess, n: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if json.loads(server.get("/api/healthz")[2])["in_flight"] >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"never saw {n} request(s) in flight")


def test_sigterm_drains_serves_and_finishes_in_flight(server_factory: type[ServerProcess]) -> None:
    """Steps:
    1. start the example under `sf-lifecycle serve` with a 2 s drain delay;
    2. hold `/api/slow?seconds=3` in flight, then send SIGTERM;
    3. healthz turns 503 within 0.5 s, and says so in its body;
    4. a new request during the drain delay still gets 200 (with Connection: close);
    5. the slow request completes with 200; the process exits 0.
    """
    server = server_factory(env={"SF_DRAIN_DELAY_MS": "2000"}).start()
    server.wait_ready()
    slow = Background(server, "/api/slow?seconds=3")
    wait_in_flight(server, 1)

    server.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    while True:
        status, _, body = server.get("/api/healthz")
        if status == 503:
            break
        assert time.monotonic() - sent < 0.5, "healthz still 200 0.5 s after SIGTERM"
        time.sleep(0.01)
    assert time.monotonic() - sent < 0.5
    health = json.loads(body)
    assert health["phase"] == "draining"
    assert health["in_flight"] == 1
    assert server.get("/api/ready")[0] == 503

    status, headers, body = server.get("/api/hello")
    assert status == 200
    assert json.loads(body) == {"hello": "sf"}
    assert headers["connection"] == "close"

    status, _, body = slow.join(10)
    assert status == 200
    assert json.loads(body) == {"slept_s": 3.0}
    assert server.wait(10) == 0
    logs = server.logs()
    assert "received SIGTERM: draining" in logs
    assert "first 503 health probe served" in logs
    assert "exit 0" in logs


def test_idle_sigint_exits_within_one_second(server_factory: type[ServerProcess]) -> None:
    """Steps: start idle (default 5 s drain delay); SIGINT; exit 0 within 1 s (no delay)."""
    server = server_factory().start()
    server.wait_ready()
    server.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert server.wait(5) == 0
    assert time.monotonic() - sent < 1.0


def test_idle_sigterm_exits_right_after_the_drain_delay(
    server_factory: type[ServerProcess],
) -> None:
    """Steps: start idle with a 1.5 s delay and the default 10-minute budget; SIGTERM; a second
    SIGTERM is ignored; exit 0 after the delay and within delay + 1 s, not after the budget."""
    server = server_factory(env={"SF_DRAIN_DELAY_MS": "1500"}).start()
    server.wait_ready()
    server.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    time.sleep(0.3)
    server.send_signal(signal.SIGTERM)
    assert server.wait(10) == 0
    elapsed = time.monotonic() - sent
    assert 1.5 <= elapsed < 2.5
    assert "SIGTERM again: ignored" in server.logs()


def test_drain_ends_after_the_nth_503_probe(server_factory: type[ServerProcess]) -> None:
    """Steps:
    1. start with a 20 s drain delay, `SF_DRAIN_AFTER_PROBES=1`, margin 500 ms;
    2. a prober polls healthz every 2 s, as Traefik does;
    3. SIGTERM at a random point of the probe cycle;
    4. exit 0 within interval + margin + 1 s, long before the 20 s delay.
    """
    server = server_factory(
        env={
            "SF_DRAIN_DELAY_MS": "20000",
            "SF_DRAIN_AFTER_PROBES": "1",
            "SF_DRAIN_MARGIN_MS": "500",
        }
    ).start()
    server.wait_ready()
    stop = threading.Event()
    statuses: list[int] = []

    def prober() -> None:
        while not stop.is_set():
            try:
                statuses.append(server.get("/api/healthz", timeout=1)[0])
            except OSError:
                statuses.append(0)
            stop.wait(2.0)

    t = threading.Thread(target=prober, daemon=True)
    t.start()
    try:
        time.sleep(0.7)
        server.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert server.wait(10) == 0
        elapsed = time.monotonic() - sent
    finally:
        stop.set()
        t.join(5)
    assert elapsed < 2.0 + 0.5 + 1.0
    assert 503 in statuses
    assert "1 probe(s) answered 503" in server.logs()


def test_budget_exceeded_exits_with_its_code(server_factory: type[ServerProcess]) -> None:
    """Steps: grace 1.5 s, no drain delay; a 10 s request in flight; SIGTERM; the process gives
    up at the budget and exits with ExitCode.BUDGET_EXCEEDED, logging what was left undone."""
    server = server_factory(
        env={"SF_DRAIN_DELAY_MS": "0", "SF_RPC_SHUTDOWN_GRACE_MS": "1500"}
    ).start()
    server.wait_ready()
    slow = Background(server, "/api/slow?seconds=10")
    wait_in_flight(server, 1)
    server.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert server.wait(10) == ExitCode.BUDGET_EXCEEDED
    assert time.monotonic() - sent < 4
    assert "grace budget of 1500 ms exceeded" in server.logs()
    slow._t.join(5)
    # The request was cut at the budget, not answered with success.
    assert not (isinstance(slow.result, tuple) and slow.result[0] == 200), slow.result


def test_second_sigint_forces_exit(server_factory: type[ServerProcess]) -> None:
    """Steps: a 10 s request in flight; SIGINT starts a drain that waits for it; a second
    SIGINT exits at once with ExitCode.FORCED."""
    server = server_factory().start()
    server.wait_ready()
    Background(server, "/api/slow?seconds=10")
    wait_in_flight(server, 1)
    server.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert server.proc is not None
    assert server.proc.poll() is None
    server.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert server.wait(5) == ExitCode.FORCED
    assert time.monotonic() - sent < 1.5


def test_invalid_configuration_fails_at_start_naming_the_variable() -> None:
    """Steps: run `serve` with a bad variable; it exits 2 before listening, naming it."""
    proc = subprocess.run(
        [sys.executable, "-m", "sf_lifecycle", "serve", "examples.sf_server:app"],
        cwd=ROOT,
        env={"SF_DRAIN_DELAY_MS": "soon", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "SF_DRAIN_DELAY_MS" in proc.stderr
    assert "'soon'" in proc.stderr


def test_bare_asgi_app_gets_health_routes(server_factory: type[ServerProcess]) -> None:
    """Steps: serve an app with no sf-lifecycle wiring; healthz/ready answer, its own route
    still answers, SIGTERM drains it like any other and it exits 0."""
    server = server_factory(
        "tests.integration.bare_app:app", env={"SF_DRAIN_DELAY_MS": "300"}
    ).start()
    server.wait_ready()
    assert server.get("/api/healthz")[0] == 200
    assert server.get("/anything")[2] == b"bare"
    server.send_signal(signal.SIGTERM)
    assert server.wait(10) == 0


def test_failing_startup_task_is_retried_until_ready(server_factory: type[ServerProcess]) -> None:
    """Steps:
    1. serve an app whose start-up task fails twice, then succeeds;
    2. `/api/ready` answers 503 meanwhile, naming the task, the failure count and the last
       error, without the state directory's path;
    3. it turns 200 without a restart (backoff 0.2 s, then 0.4 s).
    """
    server = server_factory(
        "tests.integration.shutdown_app:app", env={"SF_TEST_STARTUP_FAILS": "2"}
    ).start()
    reasons: list[str] = []
    deadline = time.monotonic() + 20
    while True:
        assert time.monotonic() < deadline, server.logs()
        try:
            status, _, body = server.get("/api/ready", timeout=1)
        except OSError:
            time.sleep(0.02)
            continue
        if status == 200:
            break
        reasons.append(json.loads(body).get("reason", ""))
        time.sleep(0.02)
    failing = [r for r in reasons if "flaky-startup failed" in r]
    assert failing, reasons
    assert any(
        "flaky-startup failed 2 time(s), retrying; last error: ConnectionError: sink "
        "unreachable at <path>" in r
        for r in failing
    ), failing
    assert all(str(server.state_dir) not in r for r in reasons)
    assert "start-up task flaky-startup done" in server.logs()
    assert "(attempt 3)" in server.logs()


SHUTDOWN_APP = "tests.integration.shutdown_app:app"


def wait_for_log(server: ServerProcess, text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.logs():
        assert time.monotonic() < deadline, server.logs()
        assert server.proc is not None
        assert server.proc.poll() is None, server.logs()
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("second", "expected"), [(signal.SIGTERM, ExitCode.OK), (signal.SIGINT, ExitCode.FORCED)]
)
def test_a_signal_during_teardown_keeps_the_handlers(
    second: signal.Signals, expected: int, server_factory: type[ServerProcess]
) -> None:
    """Steps:
    1. serve with a hook that leaves a non-daemon thread running 5 s (the interpreter's exit
       waits for it; the watchdog bounds that wait to `TEARDOWN_S`);
    2. SIGINT: the shutdown runs and decides exit 0; the process is still in its teardown;
    3. `second` arrives: a repeated SIGTERM is ignored (exit 0, by the watchdog, not killed by
       the signal); a second SIGINT exits 130 at once; no traceback either way.
    Before the fix the default handlers were back: SIGTERM killed the process (-15), SIGINT
    raised KeyboardInterrupt into the teardown (a traceback, exit 0).
    """
    server = server_factory(
        SHUTDOWN_APP, env={"SF_TEST_HOOK": "linger", "SF_DRAIN_INTERVAL_MS": "3600000"}
    ).start()
    server.wait_ready()
    server.send_signal(signal.SIGINT)
    first = time.monotonic()
    wait_for_log(server, "exit 0, ")
    time.sleep(0.3)
    assert server.proc is not None
    assert server.proc.poll() is None, server.logs()  # held by the lingering thread
    server.send_signal(second)
    sent = time.monotonic()
    code = server.wait(10)
    logs = server.logs()
    assert code == expected, logs
    assert "Traceback" not in logs
    if expected == ExitCode.FORCED:
        assert time.monotonic() - sent < 1.0, logs
    else:
        assert time.monotonic() - first < TEARDOWN_S + 1.5, logs
        assert "exit 0 decided but the process did not end" in logs


@pytest.mark.parametrize(
    ("startup", "sig"),
    [("hang", signal.SIGTERM), ("hang", signal.SIGINT), ("block", signal.SIGTERM)],
)
def test_a_signal_during_the_applications_startup_exits_3_promptly(
    startup: str, sig: signal.Signals, server_factory: type[ServerProcess]
) -> None:
    """Steps:
    1. serve an app whose own start-up hangs (awaits for ever) or blocks the loop, with a 6 s
       budget and a 1 s drain delay; it never listens;
    2. `sig` during the start-up: nothing was accepted, nothing to drain: exit 3 at once
       (within `TEARDOWN_S` + slack when the loop is blocked), with a line saying so.
    Before the fix it sat out the whole budget and exited 4, blaming a stuck hook or sink.
    """
    server = server_factory(
        SHUTDOWN_APP,
        env={
            "SF_TEST_APP_STARTUP": startup,
            "SF_RPC_SHUTDOWN_GRACE_MS": "6000",
            "SF_DRAIN_DELAY_MS": "1000",
        },
    ).start()
    wait_for_log(server, "Waiting for application startup.")
    time.sleep(0.5)
    server.send_signal(sig)
    sent = time.monotonic()
    code = server.wait(15)
    elapsed = time.monotonic() - sent
    logs = server.logs()
    assert code == ExitCode.STARTUP_FAILED, logs
    assert "Traceback" not in logs
    if startup == "hang":
        assert elapsed < 1.0, logs
        assert f"received {sig.name} during start-up" in logs
        assert "nothing was served yet, so nothing to drain" in logs
    else:
        assert elapsed < TEARDOWN_S + 1.0, logs
        assert f"{sig.name} during start-up and the start-up did not stop" in logs


def test_a_failed_startup_or_a_busy_port_exits_3(server_factory: type[ServerProcess]) -> None:
    """Steps: an app whose start-up raises exits 3 and says so; a port another socket holds
    exits 3 (before the fix: 1, uvicorn's `sys.exit(1)` escaping the loop), saying why."""
    failing = server_factory(SHUTDOWN_APP, env={"SF_TEST_APP_STARTUP": "fail"}).start()
    assert failing.wait(15) == ExitCode.STARTUP_FAILED, failing.logs()
    assert "the application's start-up failed (exit 3)" in failing.logs()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        blocked = server_factory(port=port).start()
        assert blocked.wait(15) == ExitCode.STARTUP_FAILED, blocked.logs()
    assert "start-up failed: could not listen (exit 3)" in blocked.logs()
