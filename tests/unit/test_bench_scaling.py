"""The scaling benchmark's helpers: the superlinear verdict, its note, its rows, the segments it
writes, and the SSE client's event counting. Nothing here is timed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_scaling
from benchmarks._common import Stats
from benchmarks._sse_client import Stream
from benchmarks.bench_scaling import describe, scaling, series_rows, size_label, write_segments
from sf_lifecycle._ids import is_record_id
from sf_lifecycle._segments import load_segment


def test_flat_cost_is_linear() -> None:
    s = scaling([2.0, 2.1, 1.9])
    assert s.relative == pytest.approx((1.0, 1.05, 0.95))
    assert s.growth == pytest.approx(1.05)
    assert s.superlinear is False


def test_cost_doubling_twice_is_superlinear() -> None:
    s = scaling([1.0, 2.0, 4.0])
    assert s.growth == pytest.approx(4.0)
    assert s.superlinear is True


def test_growth_is_measured_from_the_cheapest_smaller_size() -> None:
    # A fixed cost makes the smallest size dear (10); the cost then grows 1 -> 3 further up,
    # which a last-against-first comparison (0.3x) would call linear.
    s = scaling([10.0, 1.0, 3.0])
    assert s.relative[-1] == pytest.approx(0.3)
    assert s.growth == pytest.approx(3.0)
    assert s.superlinear is True


def test_threshold_is_exclusive() -> None:
    assert scaling([1.0, 2.0]).superlinear is False
    assert scaling([1.0, 2.0001]).superlinear is True
    assert scaling([1.0, 1.6], threshold=1.5).superlinear is True


@pytest.mark.parametrize("costs", [[1.0], [], [1.0, 0.0], [1.0, -2.0]])
def test_scaling_refuses_bad_series(costs: list[float]) -> None:
    with pytest.raises(ValueError, match=r"at least two|positive"):
        scaling(costs)


def test_size_label() -> None:
    assert [size_label(n) for n in (10, 1_000, 100_000, 1_000_000, 1_500)] == [
        "10",
        "1k",
        "100k",
        "1M",
        "1500",
    ]


def test_describe_names_sizes_ratios_verdict_and_baseline() -> None:
    verdict, text = describe("record", [1_000, 1_000_000], [1e-5, 1.1e-5], [2e-6, 6e-6])
    assert verdict.superlinear is False
    assert text.startswith("per-record cost 1k->1M: 1.00x->1.10x (linear; worst growth 1.10x")
    assert text.endswith("; baseline 1.00x->3.00x")
    verdict, text = describe("stream", [100, 1_000], [40.0, 120.0])
    assert verdict.superlinear is True
    assert "SUPERLINEAR" in text
    assert "baseline" not in text


def _stats(v: float) -> Stats:
    return Stats(v, v * 0.9, v * 1.1, 3)


def test_series_rows_flag_every_row_and_note_the_largest() -> None:
    # records/s halving from 1k to 1M: per-record cost doubles twice, so the series is flagged.
    rows = series_rows(
        lambda n: f"drain {size_label(n)}",
        "records/s",
        "record",
        [1_000, 100_000, 1_000_000],
        [_stats(400.0), _stats(200.0), _stats(100.0)],
        [_stats(1000.0), _stats(1000.0), _stats(1000.0)],
        "baseline",
        lambda n, rate: 1 / rate,
        ["a", "b", "c"],
    )
    assert [r["name"] for r in rows] == ["drain 1k", "drain 100k", "drain 1M"]
    assert all(r["superlinear"] is True and r["met"] is False for r in rows)
    assert all(r["goal"] == "linear" for r in rows)
    assert rows[0]["detail"] == "a"
    assert rows[2]["detail"].startswith("c; per-record cost 1k->100k->1M: 1.00x->2.00x->4.00x")
    assert rows[2]["growth"] == pytest.approx(4.0)
    assert rows[1]["ratio"] == pytest.approx(0.2)
    assert rows[2]["spread"] == [pytest.approx(90.0), pytest.approx(110.0)]


def test_series_rows_linear_series_is_met() -> None:
    rows: list[dict[str, Any]] = series_rows(
        lambda n: f"recovery {n}",
        "s",
        "record",
        [1_000, 10_000],
        [_stats(0.02), _stats(0.19)],
        [_stats(0.01), _stats(0.08)],
        "sink",
        lambda n, seconds: seconds / n,
    )
    assert [r["met"] for r in rows] == [True, True]
    assert [r["superlinear"] for r in rows] == [False, False]
    assert "detail" not in rows[0]
    assert rows[1]["per_unit_cost"] == pytest.approx(0.19 / 10_000)


def test_written_segments_are_what_the_queue_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_scaling, "SEGMENT_RECORDS", 4)
    paths = write_segments(tmp_path, 10)
    assert len(paths) == 3
    loaded = [load_segment(p) for p in paths]
    assert [len(x.records) for x in loaded] == [4, 4, 2]
    assert all(not x.problems and x.torn_at is None for x in loaded)
    records = [r for x in loaded for r in x.records]
    ids = [r["id"] for r in records]
    assert all(is_record_id(i) for i in ids)
    assert len(set(ids)) == 10
    assert records[0]["data"] == bench_scaling.RECORD


async def test_stream_counts_data_lines_split_across_chunks() -> None:
    reader = asyncio.StreamReader()
    stream = Stream(reader, None)  # type: ignore[arg-type]
    stream.target = 3
    body = (
        b'data: {"i":0}\r\n\r\n: ping\r\n\r\nid: 1\r\ndata: {"i":1}\r\n\r\nid: 2\r\ndata: 2\r\n\r\n'
    )
    # Markers at 0, 34 and 58: cut inside the first and the third, and put a chunked-encoding
    # size line (as uvicorn sends) right before the second.
    pump = asyncio.create_task(stream.pump())
    seen = []
    for piece in (body[:3], body[3:34], b"1a\r\n", body[34:60], body[60:]):
        reader.feed_data(piece)
        for _ in range(3):  # let the pump read this piece alone
            await asyncio.sleep(0)
        seen.append(stream.count)
    reader.feed_eof()
    await asyncio.wait_for(pump, 5)
    assert seen == [0, 1, 1, 2, 3]
    assert stream.count == 3
    assert stream.reached.is_set()
