"""`sf_lifecycle.testing.queue_files`: files a real queue drains and recovers, and a crash."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sf_lifecycle import FeedbackQueue
from sf_lifecycle.testing import crash_queue, link_segments, write_segment


def _payloads(n: int, tag: int) -> list[bytes]:
    ms = time.time_ns() // 1_000_000
    return [
        json.dumps({"id": f"{ms:012x}7{tag:03x}a{i:015x}", "ts": ms, "data": {"i": i}}).encode()
        for i in range(n)
    ]


class ListSink:
    def __init__(self) -> None:
        self.records: list[Mapping[str, Any]] = []

    async def __call__(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.records.extend(records)


def _masters(directory: Path, n: int, per_file: int, tag: int) -> list[Path]:
    directory.mkdir()
    payloads = _payloads(n, tag)
    return [
        write_segment(directory / f"m{k}", payloads[start : start + per_file])
        for k, start in enumerate(range(0, n, per_file))
    ]


async def test_linked_segments_are_the_queues_own_and_the_masters_stay(tmp_path: Path) -> None:
    masters = _masters(tmp_path / "masters", 7, 3, tag=1)
    q = FeedbackQueue(tmp_path / "state")
    links = link_segments(q, masters)
    assert [p.name.split(".")[1:] for p in links] == [
        ["000001", "log"],
        ["000002", "log"],
        ["000003", "log"],
    ]
    sink = ListSink()
    result = await q.drain(sink)
    await q.close()
    assert result.complete
    assert result.delivered == 7
    assert [r["data"]["i"] for r in sink.records] == list(range(7))
    assert not any(p.exists() for p in links)
    assert all(p.exists() for p in masters)


async def test_orphaned_segments_are_recovered_not_drained(tmp_path: Path) -> None:
    masters = _masters(tmp_path / "masters", 5, 5, tag=2)
    q = FeedbackQueue(tmp_path / "state")
    (link,) = link_segments(q, masters, orphaned=True)
    assert link.name.endswith(".000001.draining")
    assert not link.name.startswith(q.token)
    drained = ListSink()
    assert (await q.drain(drained)).delivered == 0
    recovered = ListSink()
    result = await q.recover(recovered)
    await q.close()
    assert result.complete
    assert result.delivered == 5
    assert sorted(r["data"]["i"] for r in recovered.records) == list(range(5))
    assert drained.records == []


async def test_a_crashed_queue_leaves_its_acknowledged_records_to_a_successor(
    tmp_path: Path,
) -> None:
    dead = FeedbackQueue(tmp_path)
    acked = [await dead.append({"n": i}) for i in range(4)]
    crash_queue(dead)
    nxt = FeedbackQueue(tmp_path)
    sink = ListSink()
    result = await nxt.recover(sink)
    await nxt.close()
    assert result.complete
    assert [r["id"] for r in sink.records] == acked
