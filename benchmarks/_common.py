"""Shared helpers for the benchmarks: statistics, interleaved rounds, servers and load.

The machine these run on is shared and noisy, so every comparison follows the same recipe:

1. Start sf-lifecycle's variant and the baseline side by side.
2. Measure them in interleaved rounds (A B A B ...), so a burst of noise from a neighbour hits
   both rather than one.
3. Report the median of each and its min-max spread, and the ratio of the medians.

Load comes from a separate process (`wrk` when installed, else `python -m benchmarks._loadgen`),
only ever against 127.0.0.1, bounded in time and in request count, so it stops by itself even if
this process dies. Servers are child processes reaped by PID in `finally`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sf_lifecycle.testing import ServerProcess

__all__ = [
    "ROOT",
    "LoadResult",
    "Stats",
    "UvicornProcess",
    "interleave",
    "load_tool",
    "make_result",
    "median",
    "run_load",
    "spread",
]

T = TypeVar("T")

#: The repository root: servers run from here so `examples.*` and `benchmarks.*` import.
ROOT = Path(__file__).resolve().parent.parent

#: Force the Python load generator even when wrk is installed (`SF_BENCH_LOADGEN=python`).
LOADGEN_ENV = "SF_BENCH_LOADGEN"


# -- statistics ------------------------------------------------------------------------------
def median(samples: Sequence[float]) -> float:
    """Median of a non-empty sequence (the middle two averaged for an even count)."""
    if not samples:
        raise ValueError("median of no samples")
    return float(statistics.median(samples))


def spread(samples: Sequence[float]) -> tuple[float, float]:
    """(min, max) of a non-empty sequence: the honest range on a noisy machine."""
    if not samples:
        raise ValueError("spread of no samples")
    return float(min(samples)), float(max(samples))


@dataclass(frozen=True, slots=True)
class Stats:
    """Median and min-max spread of one measurement's rounds."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        low, high = spread(samples)
        return cls(median(samples), low, high, len(samples))


def interleave(rounds: int, *variants: Callable[[], T]) -> list[list[T]]:
    """Run each variant once per round, in order (A B A B ...); the samples of each variant.

    Interleaving is what makes a ratio trustworthy here: a neighbour's burst lands on both
    variants of a round instead of skewing a block of one.
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    samples: list[list[T]] = [[] for _ in variants]
    for _ in range(rounds):
        for i, variant in enumerate(variants):
            samples[i].append(variant())
    return samples


def make_result(
    name: str,
    unit: str,
    value: Stats,
    baseline: Stats | None,
    baseline_name: str,
    goal: str,
    met: bool | None,
    **extra: Any,
) -> dict[str, Any]:
    """A result row in the shape the runner expects (plus spreads and any `extra` keys)."""
    ratio = None
    if baseline is not None and baseline.median != 0:
        ratio = value.median / baseline.median
    row: dict[str, Any] = {
        "name": name,
        "unit": unit,
        "value": value.median,
        "baseline_name": baseline_name,
        "baseline_value": baseline.median if baseline is not None else None,
        "ratio": ratio,
        "goal": goal,
        "met": met,
        "spread": [value.low, value.high],
        "baseline_spread": [baseline.low, baseline.high] if baseline is not None else None,
        "rounds": value.n,
    }
    row.update(extra)
    return row


# -- servers ---------------------------------------------------------------------------------
class UvicornProcess(ServerProcess):
    """Plain `uvicorn APP` (the baseline runner) as a child process on 127.0.0.1.

    Single process, `--log-level warning`, no access log: the same conditions sf-lifecycle's
    variant runs under, so a ratio compares the apps and nothing else.

    Args:
        app: `module:attribute` of the ASGI app (a factory with `factory=True`).
        factory: Pass `--factory`: `app` names a function that returns the app.
        env: Extra environment variables.
        port: Port to bind; a free one when None.
    """

    def __init__(
        self,
        app: str,
        *,
        factory: bool = False,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        super().__init__(app, env=env, port=port, cwd=ROOT)
        self.factory = factory

    def start(self) -> UvicornProcess:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env.setdefault("SF_STATE_DIR", str(self.state_dir))
        cmd = [sys.executable, "-m", "uvicorn", self.app, "--host", self.host]
        cmd += ["--port", str(self.port), "--log-level", "warning", "--no-access-log"]
        if self.factory:
            cmd.append("--factory")
        self.proc = subprocess.Popen(
            cmd, cwd=self.cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self


# -- load generation -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one load run did: completed requests, failures, and its own measured duration."""

    requests: int
    seconds: float
    errors: int
    non_2xx: int
    tool: str

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        ok = max(self.requests - self.non_2xx, 0)
        return ok / self.seconds if self.seconds > 0 else 0.0


# Counts responses per thread and stops the thread at its share of the request cap; prints one
# JSON summary line that `_parse_wrk` reads (wrk's human output changes between versions).
_WRK_SCRIPT = """
local cap = 0
local count = 0
function init(args)
  cap = tonumber(args[1] or "0")
end
function response(status, headers, body)
  count = count + 1
  if cap > 0 and count >= cap then wrk.thread:stop() end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'SFBENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def load_tool() -> str:
    """`wrk` when it is installed and not overridden by `SF_BENCH_LOADGEN=python`, else `python`."""
    if os.environ.get(LOADGEN_ENV, "").lower() == "python":
        return "python"
    return "wrk" if shutil.which("wrk") else "python"


def _check_loopback(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname
    if host != "127.0.0.1":
        raise ValueError(f"load generators only talk to 127.0.0.1, not {host!r} ({url})")


def run_load(
    url: str,
    *,
    duration_s: float,
    connections: int = 16,
    max_requests: int = 2_000_000,
    tool: str | None = None,
) -> LoadResult:
    """Hammer `url` from a separate process for `duration_s` (or `max_requests`), then report.

    Args:
        url: An `http://127.0.0.1:PORT/path` URL; anything else is refused.
        duration_s: How long the generator runs; it stops by itself.
        connections: Concurrent keep-alive connections.
        max_requests: Upper bound on requests, whatever the duration.
        tool: `wrk` or `python`; `load_tool()` when None.
    """
    _check_loopback(url)
    if duration_s <= 0 or connections < 1 or max_requests < 1:
        raise ValueError("duration_s, connections and max_requests must be positive")
    tool = tool or load_tool()
    # The generator bounds itself; this timeout only reaps one that hung.
    timeout = duration_s + 15
    if tool == "wrk":
        with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="sf-wrk-") as script:
            script.write(_WRK_SCRIPT)
            script.flush()
            secs = max(1, round(duration_s))
            cmd = ["wrk", "-t1", f"-c{connections}", f"-d{secs}s", "--timeout", "2s"]
            cmd += ["-s", script.name, url, "--", str(max_requests)]
            out = _run_bounded(cmd, timeout)
        return _parse_wrk(out)
    cmd = [sys.executable, "-m", "benchmarks._loadgen", url, "--duration", str(duration_s)]
    cmd += ["--connections", str(connections), "--max-requests", str(max_requests)]
    out = _run_bounded(cmd, timeout)
    return _parse_python(out)


def _run_bounded(cmd: list[str], timeout: float) -> str:
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {err.strip()[-500:]}")
    return out


def _parse_wrk(out: str) -> LoadResult:
    for line in out.splitlines():
        if line.startswith("SFBENCH "):
            d = json.loads(line[len("SFBENCH ") :])
            errors = d["connect"] + d["read"] + d["write"] + d["timeout"]
            return LoadResult(
                requests=d["requests"],
                seconds=d["duration_us"] / 1e6,
                errors=errors,
                non_2xx=d["status"],
                tool="wrk",
            )
    raise RuntimeError(f"wrk printed no summary:\n{out[-1000:]}")


def _parse_python(out: str) -> LoadResult:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"load generator printed no summary:\n{out[-1000:]}")
    d = json.loads(lines[-1])
    return LoadResult(
        requests=d["requests"],
        seconds=d["seconds"],
        errors=d["errors"],
        non_2xx=d["non_2xx"],
        tool="python",
    )


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder for one benchmark module, with the library's logs at ERROR meanwhile:
    recovery warns about the orphans the benchmarks make on purpose."""
    quiet = logging.getLogger("sf_lifecycle")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        quiet.setLevel(level)
