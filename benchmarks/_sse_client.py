"""SSE fan-out client, run as its own process by `bench_scaling`: N streams, M events, one JSON.

    python -m benchmarks._sse_client http://127.0.0.1:PORT --streams N --events M [--session S]

Plain asyncio sockets, no HTTP library: with 1,000 streams in one Python process the client's
own parsing must stay far cheaper than the server's work, or the figure measures the client.
A stream counts its events by the `data:` field lines it receives.

Protocol on stdin/stdout (one JSON object per line), so the parent can read the server's memory
while the streams are open:

1. Opens every stream (status 200 and headers read), prints `{"phase": "connected", ...}`.
2. Waits for a `go` line, then publishes M events with sequential keep-alive POSTs and waits
   until every stream has all M; prints `{"phase": "done", "rate": deliveries/s, ...}`.
3. Waits for a `close` line (or end of input), closes every stream and exits 0.

Bounded: only 127.0.0.1; the whole run stops after `--timeout` seconds (exit 2, with an
`{"error": ...}` line) even if the parent never writes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
import urllib.parse
from collections.abc import Sequence

EVENTS_PATH = "/api/session/events"
_MARK = b"\ndata:"


def raise_nofile(needed: int) -> int:
    """Raise this process's open-file soft limit to at least `needed` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


class Stream:
    """One open SSE response; counts `data:` lines as they arrive."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.count = 0
        self.target = 0
        self.reached = asyncio.Event()

    async def pump(self) -> None:
        tail = b"\n"  # a field line starts the body or follows a newline
        read = self.reader.read
        while True:
            chunk = await read(65536)
            if not chunk:
                return
            data = tail + chunk
            self.count += data.count(_MARK)
            tail = data[-(len(_MARK) - 1) :]
            if self.target and self.count >= self.target:
                self.reached.set()


async def open_stream(host: str, port: int, path: str) -> Stream:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    status, _ = await _read_head(reader)
    if status != 200:
        writer.close()
        raise RuntimeError(f"stream answered {status}")
    return Stream(reader, writer)


async def publish_all(host: str, port: int, path: str, events: int) -> None:
    """POST `events` events one after another on one keep-alive connection."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for i in range(events):
            body = json.dumps({"i": i}).encode()
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status, headers = await _read_head(reader)
            await reader.readexactly(int(headers.get("content-length", "0")))
            if status >= 300:
                raise RuntimeError(f"publish answered {status}")
    finally:
        writer.close()


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _stdin_reader() -> asyncio.StreamReader:
    """stdin as an asyncio stream: a blocked read must not outlive the run's timeout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run(url: str, streams: int, events: int, session: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.hostname != "127.0.0.1" or parts.port is None:
        raise SystemExit(f"only http://127.0.0.1:PORT is allowed, not {url!r}")
    host, port = parts.hostname, parts.port
    path = f"{EVENTS_PATH}?session={urllib.parse.quote(session)}"
    raise_nofile(streams + 256)
    stdin = await _stdin_reader()

    began = time.perf_counter()
    gate = asyncio.Semaphore(200)  # connects in flight: well under the listen backlog

    async def one() -> Stream:
        async with gate:
            return await open_stream(host, port, path)

    opened = await asyncio.gather(*(one() for _ in range(streams)))
    pumps = [asyncio.create_task(s.pump()) for s in opened]
    _emit({"phase": "connected", "streams": streams, "seconds": time.perf_counter() - began})
    try:
        if (await stdin.readline()).strip() != b"go":
            return
        for s in opened:
            s.target = events
        start = time.perf_counter()
        await publish_all(host, port, path, events)
        published = time.perf_counter() - start
        await asyncio.gather(*(s.reached.wait() for s in opened))
        took = time.perf_counter() - start
        delivered = sum(min(s.count, events) for s in opened)
        _emit(
            {
                "phase": "done",
                "streams": streams,
                "events": events,
                "delivered": delivered,
                "seconds": took,
                "publish_seconds": published,
                "rate": delivered / took,
            }
        )
        await stdin.readline()  # "close" (or EOF): the parent has read what it needed
    finally:
        for t in pumps:
            t.cancel()
        for s in opened:
            s.writer.close()
        await asyncio.gather(*pumps, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._sse_client")
    p.add_argument("url")
    p.add_argument("--streams", type=int, required=True)
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--session", default="fanout")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if args.streams < 1 or args.events < 1 or args.timeout <= 0:
        p.error("--streams, --events and --timeout must be positive")

    async def bounded() -> None:
        async with asyncio.timeout(args.timeout):
            await run(args.url, args.streams, args.events, args.session)

    try:
        asyncio.run(bounded())
    except TimeoutError:
        _emit({"error": f"timed out after {args.timeout:g} s"})
        return 2
    except (OSError, RuntimeError, asyncio.IncompleteReadError) as exc:
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
