"""How each cost grows with the work: drain, recovery, SSE fan-out and memory per stream.

On a shared machine absolute figures are noisy, so what this module reports is the *shape*: the
cost per unit of work (per record, per delivered event, per open stream) at each size, all
measured in the same run, sizes interleaved round by round. A series is flagged `superlinear`
when its per-unit cost at some size is more than `SUPERLINEAR_X` times its cheapest per-unit cost
at a smaller size (so a fixed start-up cost that makes the smallest size dear cannot hide growth
further up). The goal column of every row says "linear"; `met` is False for a flagged series.

1. **Drain** to a no-op sink at 1k, 100k and 1M queued records (quick: 1k, 100k). Segments are
   written once per size with `sf_lifecycle.testing.write_segment` (segments of at most
   `SEGMENT_RECORDS`), kept as master files, and hard-linked into the queue directory as the
   queue's own segments before each round (`link_segments`): the drain renames and unlinks its
   link, the master stays. Baseline: splitting and
   parsing the same records as JSON lines held in memory, one segment's worth at a time like
   the drain (the floor of any JSON-based queue; in memory so the 1M case needs only its 322 MB
   of segments on disk).
2. **Recovery** of 1k, 10k and 100k orphaned records (`.draining` files of a dead owner, linked
   the same way) into the default `SqliteSink`, a fresh database each round. Baseline: the same
   records written by the sink alone in the same batches, so the ratio is what recovery adds.
3. **SSE fan-out** to 10, 100, 1,000 and 10,000 streams (quick: 10, 100): `sf-lifecycle
   serve` running the example app, against sse-starlette with an in-memory `asyncio.Queue` per
   stream under plain uvicorn (`benchmarks._sse_baseline`). A fresh server per measurement; the
   streams come from a separate process (`benchmarks._sse_client`), which publishes events with
   sequential POSTs and times until every stream has every event: deliveries per second.
4. **Memory per open stream**: the server's VmRSS just before the client connects (after one
   warm-up stream) and with all N streams open, divided by N, in KiB; same servers as 3 (100,
   1,000 and 10,000 streams; goal <= 50 KiB). The open-file soft limit is raised for the
   servers and the client (10,000 streams need as many sockets on each side).

Run alone: `python -m benchmarks.bench_scaling [--quick]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, Stats, UvicornProcess, interleave, make_result, scratch_dir
from benchmarks._sse_baseline import EVENTS_PATH, HEALTH_PATH
from benchmarks._sse_client import raise_nofile
from sf_lifecycle import FeedbackQueue, SqliteSink
from sf_lifecycle.testing import ServerProcess, link_segments, write_segment

__all__ = ["SUPERLINEAR_X", "Scaling", "run", "scaling", "size_label"]

#: A series whose per-unit cost grows more than this across its sizes is flagged superlinear.
SUPERLINEAR_X = 2.0
#: Records per segment file written for the drain and recovery series (a long sink outage
#: leaves many small segments; a stuck drain, one big one: 100k is between the two). One
#: 1M-record segment against the same records in 100k-record ones: `bench_backlog.py`.
SEGMENT_RECORDS = 100_000
#: One feedback record; framed with its envelope it is 322 bytes, so 1M queued fit in 322 MB.
RECORD = {"kind": "feedback", "session": "s-0123456789", "text": "x" * 200}
GOAL = "linear"
APP = "examples.sf_server:app"
BASELINE_APP = "benchmarks._sse_baseline:queue_hub_app"
SSE_BASELINE = "sse-starlette + asyncio.Queue, plain uvicorn"
#: Deliveries per fan-out measurement (events = this / streams, within the bounds below).
FANOUT_DELIVERIES = {True: 4_000, False: 20_000}
FANOUT_EVENTS = (10, 400)
#: Server memory per open stream the SSE series aims under.
STREAM_KIB_GOAL = 50.0


# -- the shape of a series (pure) ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Scaling:
    """How a series' per-unit cost moves with its size.

    Attributes:
        relative: Per-unit cost at each size divided by the per-unit cost at the first size.
        growth: The largest factor by which the per-unit cost at a size exceeds the cheapest
            per-unit cost at any smaller size (1.0 or less: it never grew).
        superlinear: `growth` is above the threshold.
    """

    relative: tuple[float, ...]
    growth: float
    superlinear: bool


def scaling(per_unit: Sequence[float], threshold: float = SUPERLINEAR_X) -> Scaling:
    """Judge a series from its per-unit costs, ordered by increasing size.

    Comparing each size with the cheapest smaller one (not only last against first) keeps a
    large fixed cost at the smallest size from masking growth between the larger sizes.

    Raises:
        ValueError: fewer than two sizes, or a cost that is not positive.
    """
    if len(per_unit) < 2:
        raise ValueError("a series needs at least two sizes")
    if any(not c > 0 for c in per_unit):
        raise ValueError(f"per-unit costs must be positive, got {list(per_unit)}")
    relative = tuple(c / per_unit[0] for c in per_unit)
    growth = max(per_unit[j] / min(per_unit[:j]) for j in range(1, len(per_unit)))
    return Scaling(relative, growth, growth > threshold)


def size_label(n: int) -> str:
    """`1000` -> `1k`, `1000000` -> `1M`, `10` -> `10`."""
    for div, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def describe(
    what: str,
    sizes: Sequence[int],
    per_unit: Sequence[float],
    baseline_per_unit: Sequence[float] | None = None,
    threshold: float = SUPERLINEAR_X,
) -> tuple[Scaling, str]:
    """The series' verdict and its one-line note for the table.

    e.g. `per-record cost 1k->100k->1M: 1.00x->0.52x->0.61x (linear; worst growth 1.17x, flag
    above 2x); baseline 1.00x->0.95x->1.02x`.
    """
    s = scaling(per_unit, threshold)
    arrow = "->".join(size_label(n) for n in sizes)
    rel = "->".join(f"{r:.2f}x" for r in s.relative)
    verdict = "SUPERLINEAR" if s.superlinear else "linear"
    text = (
        f"per-{what} cost {arrow}: {rel} ({verdict}; worst growth {s.growth:.2f}x, "
        f"flag above {threshold:g}x)"
    )
    if baseline_per_unit is not None:
        b = scaling(baseline_per_unit, threshold)
        text += "; baseline " + "->".join(f"{r:.2f}x" for r in b.relative)
    return s, text


def series_rows(
    title: Callable[[int], str],
    unit: str,
    what: str,
    sizes: Sequence[int],
    values: Sequence[Stats],
    baselines: Sequence[Stats | None],
    baseline_name: str,
    per_unit: Callable[[int, float], float],
    details: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """One row per size; the series' verdict on each, its note on the largest size's row.

    Args:
        title: Row name for a size.
        per_unit: (size, median figure) -> cost per unit of work (e.g. `1 / rate`).
        details: An extra note per size (how it was measured); may be empty.
    """
    sf_cost = [per_unit(n, v.median) for n, v in zip(sizes, values, strict=True)]
    base_cost: list[float] | None = None
    if all(b is not None and b.median > 0 for b in baselines):
        base_cost = [per_unit(n, b.median) for n, b in zip(sizes, baselines, strict=True) if b]
    verdict, note = describe(what, sizes, sf_cost, base_cost)
    rows = []
    for i, (n, v, b) in enumerate(zip(sizes, values, baselines, strict=True)):
        parts = [details[i]] if details else []
        if i == len(sizes) - 1:
            parts.append(note)
        rows.append(
            make_result(
                title(n),
                unit,
                v,
                b,
                baseline_name if b is not None else "",
                GOAL,
                not verdict.superlinear,
                superlinear=verdict.superlinear,
                growth=round(verdict.growth, 3),
                size=n,
                per_unit_cost=sf_cost[i],
                **({"detail": "; ".join(parts)} if parts else {}),
            )
        )
    return rows


# -- segments written straight, without the append path ---------------------------------------
def _record_payloads(n: int, tag: int) -> list[bytes]:
    """`n` queue envelopes (valid, distinct UUIDv7-shaped ids) as the queue would write them."""
    ms = time.time_ns() // 1_000_000
    head = f"{ms:012x}7{tag & 0xFFF:03x}a"
    data = json.dumps(RECORD, separators=(",", ":"))
    tail = f'","ts":{ms},"data":{data}}}'
    return [f'{{"id":"{head}{i:015x}{tail}'.encode() for i in range(n)]


def write_segments(directory: Path, n: int, tag: int = 0) -> list[Path]:
    """Master segment files holding `n` framed records (at most `SEGMENT_RECORDS` per file)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    payloads = _record_payloads(n, tag)
    for k, start in enumerate(range(0, n, SEGMENT_RECORDS)):
        chunk = payloads[start : start + SEGMENT_RECORDS]
        paths.append(write_segment(directory / f"master-{n}-{k:04d}", chunk))
    return paths


async def _noop(records: Sequence[Mapping[str, Any]]) -> None:
    return None


def drain_once(state: Path, masters: Sequence[Path], n: int) -> float:
    """Records per second draining `masters` (queued under a live queue's token) to a no-op."""

    async def main() -> float:
        q = FeedbackQueue(state)
        try:
            link_segments(q, masters)
            began = time.perf_counter()
            result = await q.drain(_noop)
            took = time.perf_counter() - began
        finally:
            await q.close()  # no sink installed: releases the files, drains nothing
        if result.delivered != n or not result.complete:
            raise RuntimeError(f"drain delivered {result.delivered} of {n}: {result}")
        return n / took

    return asyncio.run(main())


def jsonl_once(chunks: Sequence[bytes], n: int) -> float:
    """Records per second splitting and parsing `n` JSON lines already in memory.

    One chunk at a time, each dropped before the next, as the drain holds one segment at a time:
    parsing all 1M at once would keep 1M dicts alive and charge the baseline for the garbage
    collector's passes over them (3.5x per record at 1M in a trial), which the drain avoids.
    """
    loads = json.loads
    parsed = 0
    began = time.perf_counter()
    for chunk in chunks:
        records = [loads(line) for line in chunk.splitlines()]
        parsed += len(records)
    took = time.perf_counter() - began
    if parsed != n:
        raise RuntimeError(f"parsed {parsed} of {n}")
    return n / took


def recover_once(state: Path, masters: Sequence[Path], n: int) -> float:
    """Seconds to recover `n` orphaned records (a dead owner's `.draining`) into SQLite."""
    db = state / "feedback.sqlite3"

    async def main() -> float:
        q = FeedbackQueue(state)
        sink = SqliteSink(db)
        try:
            link_segments(q, masters, orphaned=True)
            began = time.perf_counter()
            result = await q.recover(sink)
            took = time.perf_counter() - began
        finally:
            await q.close()
            sink.close()
        if result.delivered != n or not result.complete:
            raise RuntimeError(f"recovery delivered {result.delivered} of {n}: {result}")
        return took

    try:
        return asyncio.run(main())
    finally:
        _remove_db(db)


def sink_alone_once(state: Path, records: Sequence[Mapping[str, Any]], batch: int) -> float:
    """Seconds for a fresh `SqliteSink` to commit `records` in batches of `batch`."""
    db = state / "alone.sqlite3"

    async def main() -> float:
        sink = SqliteSink(db)
        try:
            began = time.perf_counter()
            for start in range(0, len(records), batch):
                await sink(records[start : start + batch])
            return time.perf_counter() - began
        finally:
            sink.close()

    try:
        return asyncio.run(main())
    finally:
        _remove_db(db)


def _remove_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{db}{suffix}")


def drain_series(root: Path, sizes: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    # The baseline's lines stay in memory: on disk they would double the 1M case's footprint.
    dirs: dict[int, tuple[Path, list[Path], list[bytes]]] = {}
    for n in sizes:
        state = root / f"drain-{n}"
        masters = write_segments(state / "masters", n)
        lines = _record_payloads(n, 1)
        chunks = [
            b"\n".join(lines[i : i + SEGMENT_RECORDS]) + b"\n" for i in range(0, n, SEGMENT_RECORDS)
        ]
        del lines
        dirs[n] = (state, masters, chunks)
    variants: list[Callable[[], float]] = []
    for n in sizes:
        state, masters, jsonl = dirs[n]
        variants.append(partial(drain_once, state, masters, n))
        variants.append(partial(jsonl_once, jsonl, n))
    samples = interleave(rounds, *variants)
    for n in sizes:
        shutil.rmtree(dirs[n][0], ignore_errors=True)
    values = [Stats.of(samples[2 * i]) for i in range(len(sizes))]
    bases: list[Stats | None] = [Stats.of(samples[2 * i + 1]) for i in range(len(sizes))]
    files = [-(-n // SEGMENT_RECORDS) for n in sizes]
    return series_rows(
        lambda n: f"scaling: drain {size_label(n)} queued records to a no-op sink",
        "records/s",
        "record",
        sizes,
        values,
        bases,
        "parse the same JSON lines, segment by segment, in memory",
        lambda n, rate: 1 / rate,
        [f"{n:,} records in {f} segment(s)" for n, f in zip(sizes, files, strict=True)],
    )


def recovery_series(root: Path, sizes: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    batch = 1_000  # the queue's default batch_records: the baseline commits the same batches
    prepared: dict[int, tuple[Path, list[Path], list[dict[str, Any]]]] = {}
    for n in sizes:
        state = root / f"recover-{n}"
        masters = write_segments(state / "masters", n, tag=2)
        records = [json.loads(p) for p in _record_payloads(n, 3)]
        prepared[n] = (state, masters, records)
    variants: list[Callable[[], float]] = []
    for n in sizes:
        state, masters, records = prepared[n]
        variants.append(partial(recover_once, state, masters, n))
        variants.append(partial(sink_alone_once, state, records, batch))
    samples = interleave(rounds, *variants)
    for n in sizes:
        shutil.rmtree(prepared[n][0], ignore_errors=True)
    values = [Stats.of(samples[2 * i]) for i in range(len(sizes))]
    bases: list[Stats | None] = [Stats.of(samples[2 * i + 1]) for i in range(len(sizes))]
    return series_rows(
        lambda n: f"scaling: recovery of {size_label(n)} orphaned records into SQLite",
        "s",
        "record",
        sizes,
        values,
        bases,
        "the SQLite sink alone, same batches",
        lambda n, seconds: seconds / n,
        [f"batches of {batch}; ratio = what recovery adds to the sink" for _ in sizes],
    )


# -- SSE: servers in child processes, streams from another -------------------------------------
def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (`VmRSS` from `/proc/<pid>/status`)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _warm(port: int, session: str) -> None:
    """One stream opened, one event published and received, stream closed: lazy imports and
    first-use allocations happen before the memory baseline is read."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            f"GET {EVENTS_PATH}?session={session} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("warm-up stream closed before its headers")
            got += chunk
        if not got.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"warm-up stream answered {got[:40]!r}")
        from sf_lifecycle.testing import http_get

        status, _, _ = http_get(
            "127.0.0.1",
            port,
            f"{EVENTS_PATH}?session={session}",
            method="POST",
            body=b'{"warm":1}',
            headers={"content-type": "application/json"},
        )
        if status >= 300:
            raise RuntimeError(f"warm-up publish answered {status}")
        while b"data:" not in got:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("warm-up stream closed before its event")
            got += chunk


def _read_json(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"SSE client silent for {timeout:g} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"SSE client exited ({proc.wait(5)}) without a result")
    data: dict[str, Any] = json.loads(line)
    if "error" in data:
        raise RuntimeError(f"SSE client: {data['error']}")
    return data


@dataclass(frozen=True, slots=True)
class FanOut:
    rate: float  # deliveries per second
    kib_per_stream: float
    connect_s: float


def fanout_once(sf: bool, streams: int, events: int, timeout: float) -> FanOut:
    """A fresh server (sf or baseline), warmed up; the client process opens `streams` streams.

    Memory is read from the server's VmRSS before the client starts and once every stream is
    open; the fan-out is timed by the client.
    """
    have = raise_nofile(streams + 1024)  # inherited by the server started below
    if have < streams + 256:
        raise RuntimeError(f"open-file limit {have} is too low for {streams:,} streams")
    server: ServerProcess
    if sf:
        env = {"SF_SSE_MAX_STREAMS": str(streams + 100), "SF_DRAIN_DELAY_MS": "0"}
        server = ServerProcess(APP, env=env, cwd=ROOT)
    else:
        server = UvicornProcess(BASELINE_APP, factory=True)
    client: subprocess.Popen[str] | None = None
    try:
        server.start()
        server.wait_ready(path="/api/ready" if sf else HEALTH_PATH)
        _warm(server.port, "warm")
        time.sleep(0.2)
        before = rss_kib(server.pid)
        cmd = [sys.executable, "-m", "benchmarks._sse_client", server.url]
        cmd += ["--streams", str(streams), "--events", str(events)]
        cmd += ["--session", "fanout", "--timeout", str(timeout)]
        client = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert client.stdin is not None
        connected = _read_json(client, timeout)
        time.sleep(0.3)  # let the server finish the last streams' set-up
        opened = rss_kib(server.pid)
        client.stdin.write("go\n")
        client.stdin.flush()
        done = _read_json(client, timeout)
        client.stdin.write("close\n")
        client.stdin.flush()
        client.wait(timeout)
        if done["delivered"] != streams * events:
            raise RuntimeError(f"delivered {done['delivered']} of {streams * events}")
        return FanOut(done["rate"], (opened - before) / streams, connected["seconds"])
    finally:
        if client is not None:
            if client.poll() is None:
                client.kill()
            client.wait(5)
            for pipe in (client.stdin, client.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        server.kill()
        server.close()


def sse_series(
    sizes: Sequence[int], memory_sizes: Sequence[int], rounds: int, quick: bool
) -> list[dict[str, Any]]:
    deliveries = FANOUT_DELIVERIES[quick]
    lo, hi = FANOUT_EVENTS
    events = {n: max(lo, min(hi, deliveries // n)) for n in sizes}
    timeout = 60.0 if quick else 120.0
    variants: list[Callable[[], FanOut]] = []
    for n in sizes:
        variants.append(partial(fanout_once, True, n, events[n], timeout))
        variants.append(partial(fanout_once, False, n, events[n], timeout))
    samples = interleave(rounds, *variants)
    sf = {n: samples[2 * i] for i, n in enumerate(sizes)}
    base = {n: samples[2 * i + 1] for i, n in enumerate(sizes)}
    rows = series_rows(
        lambda n: f"scaling: SSE fan-out to {n:,} streams",
        "events/s",
        "delivery",
        sizes,
        [Stats.of([f.rate for f in sf[n]]) for n in sizes],
        [Stats.of([f.rate for f in base[n]]) for n in sizes],
        SSE_BASELINE,
        lambda n, rate: 1 / rate,
        [
            f"{events[n]} events x {n:,} streams, sequential POSTs, streams in a separate "
            f"process; connect {min(f.connect_s for f in sf[n]):.2f} s"
            for n in sizes
        ],
    )
    mem = [n for n in memory_sizes if n in sf]
    if len(mem) >= 2:
        rows += series_rows(
            lambda n: f"scaling: server memory per open stream, {n:,} streams",
            "KiB",
            "stream",
            mem,
            [Stats.of([f.kib_per_stream for f in sf[n]]) for n in mem],
            [Stats.of([f.kib_per_stream for f in base[n]]) for n in mem],
            SSE_BASELINE,
            lambda n, kib: max(kib, 0.001),
            [
                "(VmRSS with the streams open - VmRSS before) / streams; "
                f"goal <= {STREAM_KIB_GOAL:g} KiB: "
                + (
                    "met"
                    if Stats.of([f.kib_per_stream for f in sf[n]]).median <= STREAM_KIB_GOAL
                    else "NOT met"
                )
                for n in mem
            ],
        )
    return rows


# -- the module's entry point ----------------------------------------------------------------
def run(quick: bool) -> list[dict[str, Any]]:
    """Every scaling series, as rows for `benchmarks/__main__.py`; quick keeps it near 40 s."""
    with scratch_dir("sf-bench-scaling-") as root:
        rows: list[dict[str, Any]] = []
        if quick:
            rows += drain_series(root, [1_000, 100_000], rounds=2)
            rows += recovery_series(root, [1_000, 10_000, 100_000], rounds=2)
            rows += sse_series([10, 100], [10, 100], rounds=2, quick=True)
        else:
            rows += drain_series(root, [1_000, 100_000, 1_000_000], rounds=3)
            rows += recovery_series(root, [1_000, 10_000, 100_000], rounds=3)
            rows += sse_series(
                [10, 100, 1_000, 10_000], [100, 1_000, 10_000], rounds=3, quick=False
            )
        return rows


def _main(argv: list[str]) -> int:
    began = time.monotonic()
    rows = run("--quick" in argv)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        base = "" if r["baseline_value"] is None else f"  baseline {r['baseline_value']:,.4g}"
        ratio = "" if r["ratio"] is None else f"  ratio {r['ratio']:.2f}"
        print(f"{r['name']:<{width}}  {r['value']:>12,.4g} {r['unit']:<9}{base}{ratio}")
        if r.get("detail"):
            print(f"    {r['detail']}")
    print(f"took {time.monotonic() - began:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
