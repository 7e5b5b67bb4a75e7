"""How fast an idle replica exits: SIGINT, and SIGTERM behind a prober.

1. Idle SIGINT-to-exit: `sf-lifecycle serve examples.sf_server:app` against plain uvicorn serving
   the same app. SIGINT skips the drain delay, so both should be gone at once. Goal: < 0.5 s.
2. Idle SIGTERM-to-exit with a prober polling `/api/healthz` every 2 s (what Traefik does) and
   `SF_DRAIN_AFTER_PROBES=1`: the replica waits for the next probe to see its 503, then
   `SF_DRAIN_MARGIN_MS` (500), then exits. Goal: < interval + margin + 0.5 s = 3.0 s. Plain
   uvicorn, beside it, exits at once: that speed is what drops requests behind a proxy, so here
   the ratio shows the price of not dropping them, not a regression.

Exit is the moment `Popen.wait()` returns; the clock starts just before the signal is sent. The
variants alternate round by round; each round starts a fresh server.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import ROOT, Stats, UvicornProcess, interleave, make_result
from sf_lifecycle.testing import ServerProcess

APP = "examples.sf_server:app"
PROBE_INTERVAL_S = 2.0
DRAIN_MARGIN_MS = 500
SIGINT_GOAL_S = 0.5
SIGTERM_GOAL_S = PROBE_INTERVAL_S + DRAIN_MARGIN_MS / 1000 + 0.5
#: A server still alive this long after the signal is killed and counted at this figure.
EXIT_TIMEOUT_S = 15.0


class _Prober:
    """Polls `/api/healthz` every `interval_s` on a fresh connection, as a proxy would."""

    def __init__(self, server: ServerProcess, interval_s: float) -> None:
        self.server = server
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sf-bench-prober", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.server.get("/api/healthz", timeout=1.0)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _signal_to_exit(
    server: ServerProcess, sig: int, prober_interval_s: float | None = None, phase: float = 0.0
) -> float:
    """Start `server`, wait until ready, send `sig`; seconds until the process has exited.

    With a prober, the signal is sent `phase` (0..1) of an interval after a probe, as the moment
    SIGTERM lands is unrelated to the proxy's probe cycle.
    """
    try:
        server.start()
        server.wait_ready(timeout=30, path="/api/ready")
        assert server.proc is not None
        with contextlib.ExitStack() as stack:
            if prober_interval_s is not None:
                stack.enter_context(_Prober(server, prober_interval_s))
                time.sleep(phase * prober_interval_s)
            began = time.monotonic()
            server.send_signal(sig)
            try:
                server.proc.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return EXIT_TIMEOUT_S
            elapsed = time.monotonic() - began
        if server.proc.returncode not in (0, -sig, 128 + sig):
            raise RuntimeError(
                f"{server.app} exited with {server.proc.returncode} after {sig!r}:\n{server.logs()}"
            )
        return elapsed
    finally:
        server.close()


def _sf(env: dict[str, str] | None = None) -> Callable[[], ServerProcess]:
    return lambda: ServerProcess(APP, env=env, cwd=ROOT, args=["--log-level", "warning"])


def _uvicorn() -> ServerProcess:
    return UvicornProcess(APP)


def run(quick: bool) -> list[dict[str, Any]]:
    """Median of several rounds of each; `quick` uses fewer rounds."""
    rounds = 3 if quick else 7
    sigint_sf, sigint_uv = interleave(
        rounds,
        lambda: _signal_to_exit(_sf()(), signal.SIGINT),
        lambda: _signal_to_exit(_uvicorn(), signal.SIGINT),
    )
    probes_env = {"SF_DRAIN_AFTER_PROBES": "1", "SF_DRAIN_MARGIN_MS": str(DRAIN_MARGIN_MS)}
    # Spread the signal evenly over the probe cycle (stratified, so few rounds still cover it).
    phases = [(i + 0.5) / rounds for i in range(rounds)]
    sf_phase, uv_phase = iter(phases), iter(phases)
    sigterm_sf, sigterm_uv = interleave(
        rounds,
        lambda: _signal_to_exit(
            _sf(probes_env)(), signal.SIGTERM, PROBE_INTERVAL_S, next(sf_phase)
        ),
        lambda: _signal_to_exit(_uvicorn(), signal.SIGTERM, PROBE_INTERVAL_S, next(uv_phase)),
    )
    a, b = Stats.of(sigint_sf), Stats.of(sigint_uv)
    c, d = Stats.of(sigterm_sf), Stats.of(sigterm_uv)
    return [
        make_result(
            "idle SIGINT to exit",
            "s",
            a,
            b,
            "plain uvicorn, same app",
            f"< {SIGINT_GOAL_S:g} s",
            a.median < SIGINT_GOAL_S,
            detail=f"worst {a.high:.2f} s; {rounds} rounds, a fresh server each",
        ),
        make_result(
            "idle SIGTERM to exit, probes every 2 s, SF_DRAIN_AFTER_PROBES=1",
            "s",
            c,
            d,
            "plain uvicorn (no drain: drops requests)",
            f"< {SIGTERM_GOAL_S:g} s",
            c.median < SIGTERM_GOAL_S,
            detail=(
                f"worst {c.high:.2f} s; {rounds} rounds, signal spread evenly over the probe"
                f" cycle, so expect ~{PROBE_INTERVAL_S / 2:g} s to the next probe"
                f" + {DRAIN_MARGIN_MS} ms margin"
            ),
        ),
    ]


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
