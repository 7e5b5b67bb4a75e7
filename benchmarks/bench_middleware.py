"""What sf-lifecycle costs a running app: throughput, per-request overhead, health route, import.

1. Throughput: the same tiny Starlette app with and without `Lifecycle.install()` (middleware and
   health routes), each under plain uvicorn (one process, `--log-level warning`, no access log),
   load from `wrk` in a separate process, interleaved rounds. Goal: >= 0.97x bare.
2. In process: the ASGI app called directly, with and without `LifecycleMiddleware` around the
   cheapest possible app, so the difference is the middleware alone. Goal: <= 1 us per request.
3. Health route: `/api/healthz` against the bare app's JSON route, same servers, same rounds.
   Goal: >= 0.90x: a probe should cost no more than the cheapest route in the app.
4. Import time: `import sf_lifecycle` on top of starlette + uvicorn, fresh interpreters,
   interleaved, interpreter start-up subtracted. Goal: the library adds <= 30 ms.

`python -m benchmarks.bench_middleware --profile` prints a cProfile of the in-process loop.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Scope

from benchmarks._apps import bare_app, lifecycle_app, raw_app
from benchmarks._common import (
    ROOT,
    LoadResult,
    Stats,
    UvicornProcess,
    interleave,
    load_tool,
    make_result,
    run_load,
)
from sf_lifecycle import Lifecycle, LifecycleMiddleware, Settings

THROUGHPUT_GOAL = 0.97
HEALTH_GOAL = 0.90
ADDED_NS_GOAL = 1_000.0
IMPORT_ADDED_MS_GOAL = 30.0
#: Metrics on must cost nothing per request: below the noise of two interleaved runs.
METRICS_ADDED_NS_GOAL = 50.0


# -- 1 and 3: throughput under uvicorn -------------------------------------------------------
def _throughput(quick: bool) -> list[dict[str, Any]]:
    # Many short rounds beat few long ones here: a neighbour's burst then spoils one short
    # round of each variant instead of one long round of one.
    rounds, duration_s, connections = (5, 1.0, 16) if quick else (10, 3.0, 16)
    bare = UvicornProcess("benchmarks._apps:bare_app", factory=True)
    with_lc = UvicornProcess("benchmarks._apps:lifecycle_app", factory=True)
    try:
        bare.start()
        with_lc.start()
        bare.wait_ready(path="/")
        with_lc.wait_ready(path="/api/ready")
        urls = {
            "bare": f"{bare.url}/",
            "lc": f"{with_lc.url}/",
            "health": f"{with_lc.url}/api/healthz",
        }

        def load(url: str) -> Callable[[], LoadResult]:
            return lambda: run_load(url, duration_s=duration_s, connections=connections)

        # Warm both servers (imports, first-request paths) outside the measured rounds.
        for url in urls.values():
            run_load(url, duration_s=1.0, connections=connections)
        runs = interleave(rounds, load(urls["bare"]), load(urls["lc"]), load(urls["health"]))
    finally:
        bare.close()
        with_lc.close()
    bare_runs, lc_runs, health_runs = runs
    for r in (*bare_runs, *lc_runs, *health_runs):
        if r.errors or r.non_2xx:
            raise RuntimeError(f"load run had failures: {r}")
    bare_s = Stats.of([r.rps for r in bare_runs])
    lc_s = Stats.of([r.rps for r in lc_runs])
    health_s = Stats.of([r.rps for r in health_runs])
    tool = bare_runs[0].tool

    def detail(runs: list[LoadResult]) -> str:
        paired = [r.rps / b.rps for r, b in zip(runs, bare_runs, strict=True)]
        return (
            f"per-round ratios {min(paired):.2f}..{max(paired):.2f}; {rounds} rounds x"
            f" {duration_s:g} s, {connections} connections, load from {tool}"
        )

    return [
        make_result(
            "throughput with middleware (uvicorn)",
            "req/s",
            lc_s,
            bare_s,
            "bare Starlette app",
            f">= {THROUGHPUT_GOAL:.2f}x bare",
            lc_s.median / bare_s.median >= THROUGHPUT_GOAL,
            detail=detail(lc_runs),
        ),
        make_result(
            "health route /api/healthz (uvicorn)",
            "req/s",
            health_s,
            bare_s,
            "bare Starlette JSON route",
            f">= {HEALTH_GOAL:.2f}x bare route",
            health_s.median / bare_s.median >= HEALTH_GOAL,
            detail=detail(health_runs),
        ),
    ]


# -- 2: in-process overhead ------------------------------------------------------------------
_SCOPE: Scope = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"127.0.0.1")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}
_REQUEST: Message = {"type": "http.request", "body": b"", "more_body": False}


async def _receive() -> Message:
    return _REQUEST


async def _send(message: Message) -> None:
    return None


async def _calls(app: ASGIApp, n: int) -> float:
    """Call `app` n times; nanoseconds per call."""
    scope, receive, send = _SCOPE, _receive, _send
    began = time.perf_counter_ns()
    for _ in range(n):
        await app(scope, receive, send)
    return (time.perf_counter_ns() - began) / n


def _timed(app: ASGIApp, n: int) -> Callable[[], float]:
    def run() -> float:
        gc.collect()
        return asyncio.run(_calls(app, n))

    return run


def _wrapped(replica_id: str | None, metrics_path: str | None = None) -> ASGIApp:
    lifecycle = Lifecycle(Settings(replica_id=replica_id, metrics_path=metrics_path))
    lifecycle.state.mark_ready()
    return LifecycleMiddleware(raw_app, lifecycle)


def _added_row(
    name: str, baseline_name: str, samples: list[float], bare: list[float], what: str
) -> dict[str, Any]:
    added = Stats.of([a - b for a, b in zip(samples, bare, strict=True)])
    return make_result(
        name,
        "ns/req",
        Stats.of(samples),
        Stats.of(bare),
        baseline_name,
        f"<= +{ADDED_NS_GOAL:,.0f} ns/req",
        added.median <= ADDED_NS_GOAL,
        added_ns=added.median,
        added_ns_spread=[added.low, added.high],
        detail=(
            f"adds {added.median:,.0f} ns/req (spread {added.low:,.0f}..{added.high:,.0f}); {what}"
        ),
    )


def _metrics_row(on: list[float], off: list[float], what: str) -> dict[str, Any]:
    added = Stats.of([a - b for a, b in zip(on, off, strict=True)])
    return make_result(
        "middleware per request, metrics on (in process)",
        "ns/req",
        Stats.of(on),
        Stats.of(off),
        "the same middleware, metrics off",
        f"<= +{METRICS_ADDED_NS_GOAL:.0f} ns/req",
        added.median <= METRICS_ADDED_NS_GOAL,
        added_ns=added.median,
        detail=f"adds {added.median:,.0f} ns/req (spread {added.low:,.0f}..{added.high:,.0f}); "
        + what,
    )


def _in_process(quick: bool) -> list[dict[str, Any]]:
    rounds, per_round = (5, 20_000) if quick else (10, 100_000)
    bare, mw, mw_replica, mw_metrics = interleave(
        rounds,
        _timed(raw_app, per_round),
        _timed(_wrapped(None), per_round),
        _timed(_wrapped("bench-1"), per_round),
        # Metrics on (`SF_METRICS_PATH`): the counters are kept either way and collected only
        # at scrape time, so this must cost what metrics off costs.
        _timed(_wrapped(None, "/metrics"), per_round),
    )
    what = f"{rounds} rounds x {per_round:,} calls"
    rows = [
        _added_row("middleware per request, in process", "bare ASGI app", mw, bare, what),
        _added_row(
            "middleware per request, in process, replica id set",
            "bare ASGI app",
            mw_replica,
            bare,
            what,
        ),
        _metrics_row(mw_metrics, mw, what),
    ]
    # What an app pays for `Lifecycle.install()` as a whole: the middleware plus the health
    # routes, which Starlette's router tries before the app's own routes.
    app_rounds, app_calls = (5, 4_000) if quick else (10, 20_000)
    star_bare, star_lc = interleave(
        app_rounds, _timed(bare_app(), app_calls), _timed(lifecycle_app(), app_calls)
    )
    rows.append(
        _added_row(
            "Lifecycle.install() per request, in process",
            "bare Starlette app",
            star_lc,
            star_bare,
            f"{app_rounds} rounds x {app_calls:,} calls of a one-route Starlette app",
        )
    )
    return rows


# -- 4: import time --------------------------------------------------------------------------
_BASE_IMPORTS = "import starlette.applications, starlette.routing, starlette.responses, uvicorn"


def _import_seconds(code: str) -> Callable[[], float]:
    cmd = [sys.executable, "-c", code]

    def run() -> float:
        began = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        return time.perf_counter() - began

    return run


def _import_time(quick: bool) -> list[dict[str, Any]]:
    rounds = 10 if quick else 30
    empty, base, lib = interleave(
        rounds,
        _import_seconds("pass"),
        _import_seconds(_BASE_IMPORTS),
        _import_seconds(f"{_BASE_IMPORTS}, sf_lifecycle"),
    )
    base_ms = Stats.of([(b - e) * 1e3 for b, e in zip(base, empty, strict=True)])
    lib_ms = Stats.of([(x - e) * 1e3 for x, e in zip(lib, empty, strict=True)])
    added = Stats.of([(x - b) * 1e3 for x, b in zip(lib, base, strict=True)])
    return [
        make_result(
            "import time, starlette + uvicorn + sf_lifecycle",
            "ms",
            lib_ms,
            base_ms,
            "starlette + uvicorn alone",
            f"<= +{IMPORT_ADDED_MS_GOAL:.0f} ms",
            added.median <= IMPORT_ADDED_MS_GOAL,
            added_ms=added.median,
            detail=(
                f"sf_lifecycle adds {added.median:.1f} ms"
                f" (spread {added.low:.1f}..{added.high:.1f}); {rounds} fresh interpreters each,"
                " interpreter start-up subtracted"
            ),
        )
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    """All four measurements; `quick` uses fewer and shorter rounds."""
    rows = _in_process(quick)
    rows += _import_time(quick)
    rows += _throughput(quick)
    return rows


def profile(calls: int = 200_000, top: int = 15) -> None:
    """Print where the in-process loop spends its time (cProfile inflates tiny functions)."""
    app = _wrapped("bench-1")
    prof = cProfile.Profile()
    prof.enable()
    asyncio.run(_calls(app, calls))
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_middleware")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile", action="store_true", help="profile the in-process loop instead")
    args = p.parse_args(argv)
    if args.profile:
        profile()
        return 0
    print(f"load tool: {load_tool()}")
    for row in run(args.quick):
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
