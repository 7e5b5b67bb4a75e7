"""Fallback HTTP load generator, for machines without `wrk`.

    python -m benchmarks._loadgen http://127.0.0.1:PORT/path --duration 2 --connections 16

Runs in its own process (never inside the server's), opens keep-alive HTTP/1.1 connections to
127.0.0.1 only, sends GETs back to back, and stops by itself after `--duration` seconds or
`--max-requests` responses, whichever comes first. Prints one JSON line: requests, seconds, errors,
non_2xx. It is slower than wrk, so on a fast server it can become the bottleneck and pull every
ratio towards 1: the runner says which tool produced each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class _Totals:
    requests: int = 0
    errors: int = 0
    non_2xx: int = 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; (status, server wants the connection closed)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close


async def _worker(
    host: str, port: int, request: bytes, deadline: float, cap: int, totals: _Totals
) -> None:
    while time.monotonic() < deadline and totals.requests < cap:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            totals.errors += 1
            await asyncio.sleep(0.01)
            continue
        try:
            while time.monotonic() < deadline and totals.requests < cap:
                writer.write(request)
                status, close = await asyncio.wait_for(_read_response(reader), timeout=2.0)
                totals.requests += 1
                if not 200 <= status < 400:
                    totals.non_2xx += 1
                if close:
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            totals.errors += 1
        finally:
            writer.close()


async def generate(url: str, duration_s: float, connections: int, max_requests: int) -> _Totals:
    """Run the load and return its totals."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname != "127.0.0.1" or parts.port is None:
        raise SystemExit(f"refusing {url!r}: only http://127.0.0.1:PORT/... is allowed")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{parts.port}\r\n\r\n".encode()
    totals = _Totals()
    deadline = time.monotonic() + duration_s
    await asyncio.gather(
        *(
            _worker("127.0.0.1", parts.port, request, deadline, max_requests, totals)
            for _ in range(connections)
        )
    )
    return totals


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._loadgen", description=__doc__)
    p.add_argument("url")
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    args = p.parse_args(argv)
    began = time.monotonic()
    totals = asyncio.run(generate(args.url, args.duration, args.connections, args.max_requests))
    seconds = time.monotonic() - began
    summary = {
        "requests": totals.requests,
        "seconds": seconds,
        "errors": totals.errors,
        "non_2xx": totals.non_2xx,
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
