"""SqliteSink: idempotent by id, one transaction per batch, safe concurrent creation."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from sf_lifecycle._ids import new_record_id
from sf_lifecycle._sink import Sink, SqliteSink, count_records


def rec(data: object, key: str | None = None) -> dict[str, object]:
    out: dict[str, object] = {"id": new_record_id(), "ts": 1, "data": data}
    if key:
        out["key"] = key
    return out


async def test_stores_by_id_and_ignores_redelivery(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "db" / "feedback.sqlite3")
    assert isinstance(sink, Sink)
    batch = [rec({"n": i}) for i in range(5)]
    await sink(batch)
    await sink([*batch[2:], rec({"n": 5}, key="k")])  # a redelivery after a crash
    await sink([])
    ids = await sink.ids()
    assert len(ids) == 6
    assert ids == sorted(ids)
    sink.close()
    conn = sqlite3.connect(tmp_path / "db" / "feedback.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    row = conn.execute("SELECT body, idem_key FROM feedback WHERE idem_key='k'").fetchone()
    assert row == ('{"n":5}', "k")
    conn.close()
    assert count_records(tmp_path / "db" / "feedback.sqlite3") == 6


async def test_a_failing_batch_commits_nothing(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "f.sqlite3")
    good = rec({"ok": 1})
    with pytest.raises(KeyError):
        await sink([good, {"data": "no id"}])
    assert await sink.ids() == []  # the whole batch rolled back
    await sink([good])
    assert await sink.ids() == [good["id"]]
    sink.close()


def _create_and_write(path: str, barrier: object, n: int) -> None:
    import asyncio

    barrier.wait()  # type: ignore[attr-defined]
    sink = SqliteSink(path)
    asyncio.run(sink([rec({"p": n, "i": i}) for i in range(50)]))
    sink.close()


def test_two_processes_create_the_database_at_the_same_instant(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    path = str(tmp_path / "fresh" / "feedback.sqlite3")
    procs = [ctx.Process(target=_create_and_write, args=(path, barrier, n)) for n in range(4)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert count_records(path) == 200
