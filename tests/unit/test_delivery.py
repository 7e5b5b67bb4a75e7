"""Delivering one segment file: bounded memory whatever its size, damage contained inside it."""

from __future__ import annotations

import json
import os
import tracemalloc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sf_lifecycle._framing import encode
from sf_lifecycle._ids import new_record_id
from sf_lifecycle._queue import FeedbackQueue
from sf_lifecycle.testing import link_segments, write_segment
from tests.unit.test_queue import ListSink

TEXT = "x" * 250  # a ~320-byte frame, as in the benchmarks


def payloads(n: int) -> list[bytes]:
    return [
        json.dumps({"id": new_record_id(), "ts": 0, "data": {"n": i, "t": TEXT}}).encode()
        for i in range(n)
    ]


def _fd_position(path: Path) -> int | None:
    """This process's read position in `path`, from /proc (None: the file is not open)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    return int(f.readline().split()[1])
        except OSError:
            continue
    return None


async def test_the_sink_gets_the_first_batch_before_the_file_is_read_to_its_end(
    tmp_path: Path,
) -> None:
    """1. A 12k-record segment (~3.9 MB, several read pieces) is queued.
    2. On its first batch, the sink looks at the segment: it is still open, read only part way.
    3. Every record is delivered once and the file is gone."""
    q = FeedbackQueue(tmp_path, batch_records=500)
    master = write_segment(tmp_path / "master", payloads(12_000))
    (link,) = link_segments(q, [master])
    draining = link.with_suffix(".draining")
    positions: list[int | None] = []
    sink = ListSink()

    async def watching(records: Sequence[Mapping[str, Any]]) -> None:
        if not positions:
            positions.append(_fd_position(draining))
        await sink(records)

    result = await q.drain(watching)
    await q.close()
    size = master.stat().st_size
    assert positions[0] is not None, "the segment was read whole and closed before the sink ran"
    assert positions[0] < size // 2
    assert result.delivered == 12_000
    assert result.complete
    assert len(sink.deliveries) == 12_000
    assert set(sink.deliveries.values()) == {1}
    assert not draining.exists()


async def test_memory_while_draining_does_not_grow_with_the_segment(tmp_path: Path) -> None:
    """1. A 40k-record segment (~13 MB) is queued.
    2. It is drained to a sink that keeps nothing, with allocations traced.
    3. The peak is a few MB (one piece of the file, two batches), not the file's size."""
    q = FeedbackQueue(tmp_path, batch_records=500)
    master = write_segment(tmp_path / "master", payloads(20_000))
    link_segments(q, [master])
    seen = 0

    async def count(records: Sequence[Mapping[str, Any]]) -> None:
        nonlocal seen
        seen += len(records)

    tracemalloc.start()
    try:
        result = await q.drain(count)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await q.close()
    assert seen == 20_000
    assert result.complete
    assert master.stat().st_size > 6 * 2**20
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB while draining a 6.5 MB segment"


async def test_damage_in_the_middle_of_a_big_segment_is_quarantined_the_rest_delivered(
    tmp_path: Path,
) -> None:
    """1. A dead owner's 10k-record segment (~3.2 MB) has a frame damaged in its middle and junk
       across a read-piece boundary (offset 1 MiB).
    2. Recovery delivers every other record, exactly once.
    3. The file is moved to quarantine (never deleted) and nothing is left to recover."""
    items = payloads(10_000)
    frames = [encode(p) for p in items]
    data = bytearray(b"".join(frames))
    middle = sum(len(f) for f in frames[:5_000]) + 20  # inside record 5,000's payload
    data[middle] ^= 0x01
    cut = 1 << 20
    boundary = next(k for k in range(len(frames)) if sum(len(f) for f in frames[: k + 1]) > cut)
    at = sum(len(f) for f in frames[:boundary])
    data[at:at] = b"junk" * 5  # between two frames, straddling the first read piece's end
    master = tmp_path / "master"
    master.write_bytes(bytes(data))
    q = FeedbackQueue(tmp_path)
    (link,) = link_segments(q, [master], orphaned=True)
    sink = ListSink()
    result = await q.recover(sink)
    await q.close()
    expected = {json.loads(p)["id"] for k, p in enumerate(items) if k != 5_000}
    assert set(sink.deliveries) == expected
    assert set(sink.deliveries.values()) == {1}
    assert result.complete
    assert result.quarantined == 1
    assert not link.exists()
    assert [p.name for p in (tmp_path / "feedback" / "quarantine").iterdir()] == [link.name]


def test_odd_payloads_decode_as_json_loads_decodes_them(tmp_path: Path) -> None:
    """The reader's fast JSON path gives what `json.loads` gives, record or refusal: padding,
    a BOM, UTF-16, NaN, trailing data, invalid UTF-8, a lone surrogate escape."""
    from sf_lifecycle._segments import SegmentReader

    rid = new_record_id()
    body = json.dumps({"id": rid, "ts": 0, "data": {"n": 1}})
    odd = [
        body.encode(),
        b"  " + body.encode() + b"\n",
        b"\xef\xbb\xbf" + body.encode(),
        body.encode("utf-16"),
        body.replace('{"n": 1}', "NaN").encode(),
        body.encode() + b"{}",
        body.encode()[:-2] + b"\xff}",
        body.replace('{"n": 1}', '"\\ud800"').encode(),
    ]
    path = write_segment(tmp_path / "odd", odd)
    expected: list[Any] = []
    for p in odd:
        try:
            expected.append(json.loads(p))
        except ValueError:
            continue
    with SegmentReader(path) as reader:
        got: list[Any] = []
        while batch := reader.batch(100):
            got += batch
        refused = len(reader.problems)
    assert len(got) + refused == len(odd)
    assert json.dumps(got) == json.dumps(expected)  # NaN compares unequal to itself
    assert refused == 2  # trailing data and invalid UTF-8


async def test_ids_a_sink_rejects_outside_the_batch_are_ignored_not_quarantined(
    tmp_path: Path, caplog: Any
) -> None:
    """A sink that commits the batch but names, in `RecordsRejected`, an id the batch does not
    hold: the records count as delivered, the file is removed, no empty `.rejected` file is
    written, and a warning names the file."""
    from sf_lifecycle import RecordsRejected

    stored: list[str] = []

    class Sink:
        async def __call__(self, records: Sequence[Mapping[str, Any]]) -> None:
            stored.extend(r["id"] for r in records)
            raise RecordsRejected(["not-in-this-batch"], "CheckViolation (SQLSTATE 23514)")

    sink = Sink()
    q = FeedbackQueue(tmp_path)
    try:
        ids = [await q.append({"n": i}) for i in range(3)]
        with caplog.at_level("WARNING", logger="sf_lifecycle"):
            result = await q.drain(sink)
        assert (result.complete, result.delivered, result.rejected) == (True, 3, 0)
        assert stored == ids
        assert list((tmp_path / "feedback").glob("*.draining")) == []
        quarantine = tmp_path / "feedback" / "quarantine"
        assert not quarantine.exists() or list(quarantine.iterdir()) == []
        assert "rejected 1 id(s) not in the batch" in caplog.text
    finally:
        q._release()
