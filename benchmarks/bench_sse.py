"""Session event streams: publish-to-receive latency and fan-out, against an in-memory baseline.

Variants, all served by uvicorn in this process on 127.0.0.1 (one event loop, so client and
server share the CPU equally for both):

* **sf**: `session_event_routes` over `FileEventLog`. "Same replica" streams from the server
  the event is published on (woken at once by the local append); "across replicas" streams from
  a second server with its own `FileEventLog` on the same directory, which learns of the append
  from its session watcher (inotify on Linux; polling every 50 ms without it).
* **baseline**: sse-starlette's `EventSourceResponse` fed from an `asyncio.Queue` per stream, in
  memory. It cannot resume or cross replicas, so it is the floor, not a competitor.

1. Latency: one stream; events published one at a time with `POST`, each stamped with the time
   just before the request; receive time minus stamp. p50 and p99 over all events. Across
   replicas each publish waits a random 0-50 ms first, so it lands at a random phase of the
   watcher's recheck when polling (a closed loop would otherwise always wait a whole interval).
2. Fan-out: 100 streams on one session; events appended in-process as fast as possible, one
   loop turn each (as separate POSTs would be); deliveries per second until every stream has
   every event.

Rounds alternate sf and baseline (A B A B) so noise from neighbours lands on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from benchmarks._common import Stats, make_result
from benchmarks._sse_baseline import EVENTS_PATH, QueueHub
from sf_lifecycle import FileEventLog, Lifecycle, Settings, session_event_routes
from sf_lifecycle.testing import free_port


def inotify_in_use() -> bool:
    """Whether this process holds an inotify descriptor: only the event logs' watchers open one
    here, so this tells what `watch="auto"` picked on this machine."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return False
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == "anon_inode:inotify":
                return True
    return False


STREAMS = 100
SAME_P50_GOAL_MS = 10.0
CROSS_P50_GOAL_MS = 10.0
FANOUT_GOAL_RATIO = 0.8


@contextlib.asynccontextmanager
async def _serve(app: Any) -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                raise RuntimeError("uvicorn did not start")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


class _Sf:
    def __init__(self, state_dir: Path) -> None:
        s = Settings(state_dir=state_dir, sse_max_streams=10_000, feedback_max_bytes=65_536)
        self.lifecycle = Lifecycle(s)
        self.log = FileEventLog.from_settings(s)
        self.app = self.lifecycle.install(
            Starlette(routes=session_event_routes(self.lifecycle, self.log))
        )


async def _open_stream(
    client: httpx.AsyncClient, url: str, session: str, on_data: Callable[[bytes], None]
) -> tuple[asyncio.Task[None], asyncio.Event]:
    """Open an SSE stream; `on_data` gets each `data:` payload. Returns (task, connected)."""
    connected = asyncio.Event()

    async def run() -> None:
        async with client.stream("GET", url + EVENTS_PATH, params={"session": session}) as r:
            connected.set()
            buf = b""
            async for chunk in r.aiter_bytes():
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.startswith(b"data: "):
                        on_data(line[6:].rstrip(b"\r"))

    task = asyncio.create_task(run())
    await asyncio.wait_for(connected.wait(), 5)
    return task, connected


async def _latency_round(
    client: httpx.AsyncClient,
    pub_url: str,
    sub_url: str,
    session: str,
    n: int,
    jitter_s: float = 0.0,
) -> list[float]:
    got: dict[int, float] = {}
    arrived = asyncio.Event()

    def on_data(payload: bytes) -> None:
        got[json.loads(payload)["i"]] = time.perf_counter()
        arrived.set()

    task, _ = await _open_stream(client, sub_url, session, on_data)
    await asyncio.sleep(0.05)
    out: list[float] = []
    try:
        for i in range(n):
            if jitter_s:
                # Publish at a random phase of the reader's poll: a closed loop would otherwise
                # lock onto the poll and always wait a whole interval.
                await asyncio.sleep(random.uniform(0, jitter_s))
            arrived.clear()
            sent = time.perf_counter()
            r = await client.post(pub_url + EVENTS_PATH, params={"session": session}, json={"i": i})
            r.raise_for_status()
            while i not in got:
                await asyncio.wait_for(arrived.wait(), 5)
                arrived.clear()
            out.append((got[i] - sent) * 1000)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await task
    return out


async def _fanout_round(
    client: httpx.AsyncClient,
    url: str,
    session: str,
    n: int,
    publish: Callable[[int], Awaitable[None]],
) -> float:
    counts = [0] * STREAMS
    done = asyncio.Event()
    finished = 0

    def make(k: int) -> Callable[[bytes], None]:
        def on_data(_: bytes) -> None:
            nonlocal finished
            counts[k] += 1
            if counts[k] == n:
                finished += 1
                if finished == STREAMS:
                    done.set()

        return on_data

    tasks = [(await _open_stream(client, url, session, make(k)))[0] for k in range(STREAMS)]
    await asyncio.sleep(0.1)
    began = time.perf_counter()
    try:
        for i in range(n):
            await publish(i)
        await asyncio.wait_for(done.wait(), 60)
        elapsed = time.perf_counter() - began
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return STREAMS * n / elapsed


def _pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


def _stats(rounds: list[list[float]], q: float) -> Stats:
    """The percentile of each round; their median and min-max (so the value is inside its spread).

    A percentile of all rounds pooled is a different sample from the per-round ones: a p99
    pooled over rounds can fall outside the range of the rounds' p99s, which made a row's value
    contradict its own spread.
    """
    return Stats.of([_pct(r, q) for r in rounds])


async def _run(quick: bool) -> list[dict[str, Any]]:
    rounds = 3 if quick else 7
    n_lat = 40 if quick else 150
    n_fan = 30 if quick else 100
    hub = QueueHub()
    with tempfile.TemporaryDirectory(prefix="sf-bench-sse-") as tmp:
        a, b = _Sf(Path(tmp)), _Sf(Path(tmp))
        limits = httpx.Limits(max_connections=STREAMS + 20, max_keepalive_connections=STREAMS)
        async with (
            _serve(a.app) as url_a,
            _serve(b.app) as url_b,
            _serve(hub.app()) as url_q,
            httpx.AsyncClient(timeout=30, limits=limits) as client,
        ):
            same: list[list[float]] = []
            cross: list[list[float]] = []
            base: list[list[float]] = []
            fan_sf: list[float] = []
            fan_q: list[float] = []
            for r in range(rounds):
                same.append(await _latency_round(client, url_a, url_a, f"same{r}", n_lat))
                base.append(await _latency_round(client, url_q, url_q, f"q{r}", n_lat))
                cross.append(await _latency_round(client, url_a, url_b, f"cross{r}", n_lat, 0.05))
                watching = "inotify" if inotify_in_use() else "polling every 50 ms"

                async def pub_sf(i: int, session: str = f"fan{r}") -> None:
                    await a.log.append(session, {"i": i})

                async def pub_q(i: int) -> None:
                    hub.publish_local(json.dumps({"i": i}))
                    # One loop turn per event, as with real publishes (and with the file log's
                    # append): otherwise the queue batches the whole burst for free.
                    await asyncio.sleep(0)

                fan_sf.append(await _fanout_round(client, url_a, f"fan{r}", n_fan, pub_sf))
                fan_q.append(await _fanout_round(client, url_q, "fanq", n_fan, pub_q))
            for sf in (a, b):
                sf.lifecycle.state.begin_closing()
                await sf.log.aclose()
    base50, base99 = _stats(base, 50), _stats(base, 99)
    s50, s99 = _stats(same, 50), _stats(same, 99)
    c50, c99 = _stats(cross, 50), _stats(cross, 99)
    fs, fq = Stats.of(fan_sf), Stats.of(fan_q)
    baseline = "sse-starlette + asyncio.Queue (in memory, same replica)"
    detail = f"{rounds} rounds x {n_lat} events, one stream"
    return [
        make_result(
            "SSE publish-to-receive p50, same replica",
            "ms",
            s50,
            base50,
            baseline,
            f"< {SAME_P50_GOAL_MS:g} ms",
            s50.median < SAME_P50_GOAL_MS,
            detail=detail,
        ),
        make_result(
            "SSE publish-to-receive p99, same replica",
            "ms",
            s99,
            base99,
            baseline,
            "< 50 ms",
            s99.median < 50,
            detail=detail,
        ),
        make_result(
            "SSE publish-to-receive p50, across replicas",
            "ms",
            c50,
            base50,
            baseline + "; it cannot cross replicas",
            f"< {CROSS_P50_GOAL_MS:g} ms",
            c50.median < CROSS_P50_GOAL_MS,
            detail=detail + f"; the other replica's watcher: {watching}",
        ),
        make_result(
            "SSE publish-to-receive p99, across replicas",
            "ms",
            c99,
            base99,
            baseline + "; it cannot cross replicas",
            "< 50 ms",
            c99.median < 50,
            detail=detail + f"; the other replica's watcher: {watching}",
        ),
        make_result(
            f"SSE fan-out to {STREAMS} streams",
            "events/s",
            fs,
            fq,
            baseline,
            f">= {FANOUT_GOAL_RATIO:g} x baseline",
            fq.median > 0 and fs.median / fq.median >= FANOUT_GOAL_RATIO,
            detail=f"{rounds} rounds x {n_fan} events x {STREAMS} streams",
        ),
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    """Run the SSE benchmarks (a fresh event loop); `quick` keeps it under about 20 s."""
    return asyncio.run(_run(quick))


if __name__ == "__main__":
    import sys

    for row in run("--full" not in sys.argv):
        print(
            f"{row['name']:<48} {row['value']:>10.2f} {row['unit']:<9} "
            f"baseline {row['baseline_value']:>10.2f}  ratio {row['ratio']:.2f}  "
            f"goal {row['goal']}: {'met' if row['met'] else 'NOT met'}"
        )
