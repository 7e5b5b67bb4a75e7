"""The durable feedback queue against the obvious ways to store a write durably.

Every variant stores ~300-byte JSON records and returns only once each is on disk:

* **sf**: `FeedbackQueue.append`, N concurrent asyncio writers (group commit on one I/O thread).
* **raw log**: one file, `write` + `fsync` per record in a plain loop (no framing, no checksum,
  no event loop): the floor the append goals are stated against. A single writer cannot beat
  it; concurrent writers beat it only by sharing fsyncs.
* **raw log, preallocated**: the same loop on a file preallocated with zeros, `pwrite` +
  `fdatasync` (what a preallocating writer could reach; measured, not adopted).
* **raw log via to_thread**: the same, but from asyncio the way an async app must do it
  (`await asyncio.to_thread(write_and_fsync)`), so the thread hop is paid as in **sf**.
* **sqlite**: SQLite WAL, `synchronous=FULL`, one transaction per record.
* **persist-queue**: `persistqueue.SQLiteAckQueue`, one `put` per record (auto-commit).

Then: drain throughput to a no-op sink (baseline: reading a JSON-lines log and parsing it),
append-to-sink latency under steady load with the background drainer, the start-up scan with no
orphans (baseline: one `os.listdir`), and recovery of orphans into SQLite (baseline: the same
batches written by the sink alone, so the ratio shows how much the queue adds; three pairs, the
medians compared).

Rounds alternate the variants (A B C A B C) so a noisy neighbour hits all of them.
Run alone: `python -m benchmarks.bench_queue [--quick]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import Stats, interleave, make_result
from sf_lifecycle import FeedbackQueue, SqliteSink
from sf_lifecycle.testing import crash_queue

RECORD = {"kind": "feedback", "session": "s-0123456789", "text": "x" * 230}
RAW = json.dumps({"id": "0" * 32, "ts": 0, "data": RECORD}).encode() + b"\n"  # ~300 bytes


class _Tmp:
    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="sf-bench-queue-"))
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# -- appends -----------------------------------------------------------------------------------
def sf_appends(writers: int, n: int) -> float:
    async def main(state: Path) -> float:
        q = FeedbackQueue(state)
        await q.append(RECORD)  # the segment exists: no first-append directory fsync

        async def writer(k: int) -> None:
            for _ in range(k):
                await q.append(RECORD)

        per = max(1, n // writers)
        began = time.perf_counter()
        await asyncio.gather(*(writer(per) for _ in range(writers)))
        took = time.perf_counter() - began
        await q.close()  # no sink installed: nothing drained, only the append path is measured
        return per * writers / took

    with _Tmp() as state:
        return asyncio.run(main(state))


def raw_log(n: int) -> float:
    with _Tmp() as d:
        fd = os.open(d / "raw.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, RAW)
            os.fsync(fd)
            began = time.perf_counter()
            for _ in range(n):
                os.write(fd, RAW)
                os.fsync(fd)
            return n / (time.perf_counter() - began)
        finally:
            os.close(fd)


def raw_log_preallocated(n: int) -> float:
    """The raw loop on a segment preallocated with zeros, `pwrite` + `fdatasync` per record.

    What a preallocating writer could reach: no size or block-map change to journal per
    record. Measured, not adopted (see the README's note on the single writer)."""
    with _Tmp() as d:
        fd = os.open(d / "raw.log", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, (n + 1) * len(RAW))
            os.fsync(fd)
            os.pwrite(fd, RAW, 0)
            os.fdatasync(fd)
            offset = len(RAW)
            began = time.perf_counter()
            for _ in range(n):
                os.pwrite(fd, RAW, offset)
                os.fdatasync(fd)
                offset += len(RAW)
            return n / (time.perf_counter() - began)
        finally:
            os.close(fd)


def raw_log_to_thread(n: int) -> float:
    async def main(fd: int) -> float:
        def one() -> None:
            os.write(fd, RAW)
            os.fsync(fd)

        await asyncio.to_thread(one)
        began = time.perf_counter()
        for _ in range(n):
            await asyncio.to_thread(one)
        return n / (time.perf_counter() - began)

    with _Tmp() as d:
        fd = os.open(d / "raw.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            return asyncio.run(main(fd))
        finally:
            os.close(fd)


def sqlite_per_record(n: int) -> float:
    with _Tmp() as d:
        conn = sqlite3.connect(d / "q.sqlite3", isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
            body = RAW.decode()
            began = time.perf_counter()
            for _ in range(n):
                conn.execute("BEGIN")
                conn.execute("INSERT INTO q (body) VALUES (?)", (body,))
                conn.execute("COMMIT")
            return n / (time.perf_counter() - began)
        finally:
            conn.close()


def persist_queue(n: int) -> float:
    from persistqueue import SQLiteAckQueue

    with _Tmp() as d:
        q = SQLiteAckQueue(str(d / "pq"), auto_commit=True, multithreading=True)
        began = time.perf_counter()
        for _ in range(n):
            q.put(RECORD)
        rate = n / (time.perf_counter() - began)
        q.close()
        return rate


# -- drain, latency, start-up ------------------------------------------------------------------
async def _fill(q: FeedbackQueue, n: int) -> None:
    async def writer(k: int) -> None:
        for _ in range(k):
            await q.append(RECORD)

    await asyncio.gather(*(writer(n // 100) for _ in range(100)))


def sf_drain(n: int) -> float:
    async def main(state: Path) -> float:
        q = FeedbackQueue(state, batch_records=1000)
        await _fill(q, n)

        async def noop(records: Sequence[Mapping[str, Any]]) -> None:
            return None

        began = time.perf_counter()
        result = await q.drain(noop)
        took = time.perf_counter() - began
        assert result.delivered == n // 100 * 100, result
        await q.close()
        return result.delivered / took

    with _Tmp() as state:
        return asyncio.run(main(state))


def jsonl_drain(n: int) -> float:
    with _Tmp() as d:
        path = d / "log.draining"
        path.write_bytes(RAW * n)
        began = time.perf_counter()
        with open(path, "rb") as f:
            records = [json.loads(line) for line in f.read().splitlines()]
        took = time.perf_counter() - began
        assert len(records) == n
        return n / took


def drain_latency(seconds: float, rate: float) -> tuple[float, float]:
    """p50 and p99 ms from acknowledgement to the sink, with the default 200 ms drainer."""

    async def main(state: Path) -> tuple[float, float]:
        q = FeedbackQueue(state)
        acked: dict[str, float] = {}
        lat: list[float] = []

        async def sink(records: Sequence[Mapping[str, Any]]) -> None:
            now = time.perf_counter()
            lat.extend(now - acked[r["id"]] for r in records if r["id"] in acked)

        q.start_drainer(sink)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            rid = await q.append(RECORD)
            acked[rid] = time.perf_counter()
            await asyncio.sleep(1 / rate)
        q.sink = sink
        await q.close()
        qs = statistics.quantiles(lat, n=100)
        return qs[49] * 1000, qs[98] * 1000

    with _Tmp() as state:
        return asyncio.run(main(state))


def startup_scan() -> tuple[float, float]:
    """(sf recover() with no orphans, one os.listdir), in ms; a live peer shares the dir."""

    async def main(state: Path) -> tuple[float, float]:
        peer = FeedbackQueue(state)
        await peer.append(RECORD)
        q = FeedbackQueue(state)

        async def sink(records: Sequence[Mapping[str, Any]]) -> None:
            raise AssertionError("nothing to recover")

        await q.recover(sink)  # warm imports and thread pool
        samples, base = [], []
        for _ in range(20):
            began = time.perf_counter()
            await q.recover(sink)
            samples.append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            os.listdir(state / "feedback")
            base.append((time.perf_counter() - began) * 1000)
        await peer.close()
        await q.close()
        return statistics.median(samples), statistics.median(base)

    with _Tmp() as state:
        return asyncio.run(main(state))


def recovery_vs_sink(n: int) -> tuple[float, float]:
    """(seconds to recover n orphaned records into SQLite, seconds for the sink alone)."""

    async def main(state: Path) -> tuple[float, float]:
        dead = FeedbackQueue(state)
        await _fill(dead, n)
        crash_queue(dead)  # as if killed: files stay, the lock is free
        sink = SqliteSink(state / "feedback.sqlite3")
        q = FeedbackQueue(state, batch_records=1000)
        began = time.perf_counter()
        result = await q.recover(sink)
        took = time.perf_counter() - began
        assert result.delivered == n // 100 * 100, result
        alone = SqliteSink(state / "alone.sqlite3")
        batch: list[dict[str, Any]] = [
            {"id": f"{i:032x}", "ts": 0, "data": RECORD} for i in range(1000)
        ]
        began = time.perf_counter()
        for k in range(n // 1000):
            await alone([{**r, "id": f"{k:08x}{r['id'][8:]}"} for r in batch])
        base = time.perf_counter() - began
        await q.close()
        sink.close()
        alone.close()
        return took, base

    with _Tmp() as state:
        return asyncio.run(main(state))


# -- the table ---------------------------------------------------------------------------------
def _ratio_row(
    name: str, ours: list[float], base: list[float], base_name: str, goal_x: float | None
) -> dict[str, Any]:
    value, baseline = Stats.of(ours), Stats.of(base)
    met = None if goal_x is None else value.median >= goal_x * baseline.median
    goal = "report" if goal_x is None else f">= {goal_x:g}x {base_name}"
    return make_result(name, "appends/s", value, baseline, base_name, goal, met)


def run(quick: bool) -> list[dict[str, Any]]:
    """Measure everything; rows as `benchmarks/__main__.py` expects."""
    # The recovery benchmark makes orphans on purpose: keep its warning out of the table.
    quiet = logging.getLogger("sf_lifecycle")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _run(quick)
    finally:
        quiet.setLevel(level)


def _run(quick: bool) -> list[dict[str, Any]]:
    rounds = 3 if quick else 5
    n1 = 300 if quick else 1500
    rows: list[dict[str, Any]] = []

    one = interleave(
        rounds,
        lambda: sf_appends(1, n1),
        lambda: raw_log(n1),
        lambda: raw_log_to_thread(n1),
        lambda: raw_log_preallocated(n1),
    )
    rows.append(_ratio_row("queue append, 1 writer", one[0], one[1], "raw fsync log", 0.85))
    rows.append(
        _ratio_row(
            "queue append, 1 writer (async baseline)", one[0], one[2], "raw log via to_thread", 0.9
        )
    )
    rows.append(
        _ratio_row(
            "raw log preallocated + fdatasync (not adopted)",
            one[3],
            one[1],
            "raw fsync log",
            None,
        )
    )

    n8 = 1600 if quick else 8000
    eight = interleave(
        rounds,
        lambda: sf_appends(8, n8),
        lambda: raw_log(n1),
        lambda: sqlite_per_record(n1),
        lambda: persist_queue(n1),
    )
    rows.append(_ratio_row("queue append, 8 writers", eight[0], eight[1], "raw fsync log", 3))
    rows.append(
        _ratio_row("queue append, 8 writers", eight[0], eight[2], "sqlite WAL FULL txn/record", 3)
    )
    rows.append(_ratio_row("queue append, 8 writers", eight[0], eight[3], "persist-queue", 3))

    n64 = 6400 if quick else 32000
    sixty4 = interleave(rounds, lambda: sf_appends(64, n64), lambda: raw_log(n1))
    rows.append(_ratio_row("queue append, 64 writers", sixty4[0], sixty4[1], "raw fsync log", 3))

    nd = 20_000 if quick else 100_000
    drain = interleave(rounds, lambda: sf_drain(nd), lambda: jsonl_drain(nd))
    value, baseline = Stats.of(drain[0]), Stats.of(drain[1])
    rows.append(
        make_result(
            "queue drain to a no-op sink",
            "records/s",
            value,
            baseline,
            "read + parse a JSON-lines log",
            ">= 100000 records/s",
            value.median >= 100_000,
        )
    )

    p50, p99 = drain_latency(1.0 if quick else 3.0, 500)
    rows.append(
        make_result(
            "append-to-sink latency p50 (200 ms drainer)",
            "ms",
            Stats.of([p50]),
            None,
            "",
            "<= 200 ms",
            p50 <= 200,
        )
    )
    rows.append(
        make_result(
            "append-to-sink latency p99 (200 ms drainer)",
            "ms",
            Stats.of([p99]),
            None,
            "",
            "<= 300 ms",
            p99 <= 300,
        )
    )

    scan, listdir = startup_scan()
    rows.append(
        make_result(
            "start-up scan, no orphans",
            "ms",
            Stats.of([scan]),
            Stats.of([listdir]),
            "one os.listdir",
            "< 1 ms",
            scan < 1.0,
        )
    )

    nr = 20_000 if quick else 100_000
    pairs = [recovery_vs_sink(nr) for _ in range(2 if quick else 3)]  # each pair back to back
    took, base = Stats.of([t for t, _ in pairs]), Stats.of([b for _, b in pairs])
    rows.append(
        make_result(
            f"recovery of {nr} orphaned records into SQLite",
            "s",
            took,
            base,
            "the SQLite sink alone",
            "<= 1.3x the sink alone",
            took.median <= 1.3 * base.median,
        )
    )
    return rows


def _main(argv: list[str]) -> int:
    quick = "--quick" in argv
    rows = run(quick)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x {r['baseline_name']}"
        mark = {True: "met", False: "MISSED", None: ""}[r["met"]]
        print(f"{r['name']:<{width}}  {r['value']:>12.3f} {r['unit']:<10} {ratio:<40} {mark}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
