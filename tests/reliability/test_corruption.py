"""Real queue files truncated at every offset and hit by bit flips, then recovered.

`tests/unit/test_framing.py` proves the properties on the framing alone; here the files are
written by a real `FeedbackQueue`, recovered by another, and the log lines are checked: a torn
tail is dropped without quarantine, damage is quarantined with a warning naming the file and the
offset, every good record is delivered, and recovery (and a real server's start-up) never fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path

import pytest

from sf_lifecycle._framing import scan
from sf_lifecycle._queue import FeedbackQueue
from tests.unit.test_queue import ListSink, die

from ._harness import Oracle, clean_restart, leftovers, post_one, start_server

FLIPS = int(os.environ.get("SF_RELIABILITY_FLIPS", "150"))


async def real_segment(state: Path, n: int) -> tuple[bytes, list[str], list[int]]:
    """A segment written by a real queue: (bytes, ids in order, end offset of each frame)."""
    q = FeedbackQueue(state)
    ids = [await q.append({"i": i, "text": "é" * (i % 3)}) for i in range(n)]
    path = q.dir / f"{q.token}.000001.log"
    die(q)
    data = path.read_bytes()
    path.unlink()
    (q.dir / f"{q.token}.lock").unlink()
    ends = []
    pos = 0
    for off, payload in scan(data).records:
        assert off == pos
        pos = off + 16 + len(payload)
        ends.append(pos)
    assert ends[-1] == len(data)
    return data, ids, ends


def orphan(directory: Path, k: int, data: bytes) -> Path:
    path = directory / f"{k:022x}.000001.log"
    path.write_bytes(data)
    return path


async def test_truncation_at_every_offset_delivers_the_whole_records_before_the_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, ids, ends = await real_segment(tmp_path / "src", 4)
    state = tmp_path / "state"
    rescuer = FeedbackQueue(state)
    with caplog.at_level(logging.INFO, logger="sf_lifecycle.queue"):
        for cut in range(len(data) + 1):
            path = orphan(rescuer.dir, cut + 1, data[:cut])
            sink = ListSink()
            result = await rescuer.recover(sink)
            whole = [rid for rid, end in zip(ids, ends, strict=True) if end <= cut]
            assert list(sink.deliveries) == whole, cut
            assert result.complete
            assert result.quarantined == 0, cut  # a cut is a torn tail, never damage
            assert not path.exists()
            if cut not in (0, *ends):
                assert f"{path.name}: dropped a torn tail of" in caplog.text
            caplog.clear()
    assert os.listdir(rescuer.quarantine_dir) == []
    await rescuer.close()


async def test_random_bit_flips_are_quarantined_with_file_and_offset_and_the_rest_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, ids, ends = await real_segment(tmp_path / "src", 5)
    starts = [0, *ends[:-1]]
    state = tmp_path / "state"
    rescuer = FeedbackQueue(state)
    rng = random.Random(6)
    for k in range(FLIPS):
        pos = rng.randrange(len(data))
        damaged = bytearray(data)
        damaged[pos] ^= 1 << rng.randrange(8)
        path = orphan(rescuer.dir, k + 1, bytes(damaged))
        hit = next(i for i, (s, e) in enumerate(zip(starts, ends, strict=True)) if s <= pos < e)
        sink = ListSink()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sf_lifecycle.queue"):
            result = await rescuer.recover(sink)
        assert result.complete
        assert result.quarantined == 1, pos
        assert set(sink.deliveries) == set(ids) - {ids[hit]}, pos
        assert f"corrupt record in {path} at offset {starts[hit]}:" in caplog.text
        assert (rescuer.quarantine_dir / path.name).read_bytes() == bytes(damaged)
    assert len(os.listdir(rescuer.quarantine_dir)) == FLIPS
    await rescuer.close()


async def test_hostile_entries_in_the_queue_directory_do_not_stop_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Empty segments, garbage, zeros, and under segment names a directory, a symbolic link to a
    valid segment elsewhere and a FIFO: recovery completes, the good file is delivered, the
    non-files are moved to quarantine without being followed.

    Regression: a directory under a segment's name made `recover` raise IsADirectoryError, so
    the start-up task failed and the replica never became ready; a FIFO would block it forever.
    """
    data, ids, _ = await real_segment(tmp_path / "src", 3)
    q = FeedbackQueue(tmp_path / "state")
    orphan(q.dir, 1, b"")
    orphan(q.dir, 2, os.urandom(300))
    orphan(q.dir, 3, b"\x00" * 4096)
    orphan(q.dir, 4, data)
    (q.dir / f"{5:022x}.000001.draining").mkdir()
    (q.dir / "notes.txt").write_text("operator notes")
    (q.dir / f"{6:022x}.lock").write_text("")
    outside = tmp_path / "outside.log"  # a valid segment outside the state dir ...
    outside.write_bytes(await other_segment(tmp_path / "other"))
    (q.dir / f"{7:022x}.000001.log").symlink_to(outside)  # ... reached through a link
    os.mkfifo(q.dir / f"{8:022x}.000001.log")  # opening it for reading would block forever
    sink = ListSink()
    with caplog.at_level(logging.WARNING, logger="sf_lifecycle.queue"):
        result = await asyncio.wait_for(q.recover(sink), 10)
    assert result.complete
    assert set(sink.deliveries) == set(ids)  # nothing read through the link
    assert outside.exists()  # and the link's target was not deleted
    assert (q.dir / "notes.txt").exists()
    assert sorted(os.listdir(q.quarantine_dir)) == [
        f"{k:022x}.000001.{kind}"
        for k, kind in [(2, "log"), (5, "draining"), (7, "log"), (8, "log")]
    ]
    assert "a symbolic link (refused" in caplog.text
    assert "not a regular file" in caplog.text
    await q.close()


async def other_segment(state: Path) -> bytes:
    data, _, _ = await real_segment(state, 2)
    return data


@pytest.mark.integration
def test_a_server_starts_on_a_damaged_state_dir_and_delivers_the_good_records(
    tmp_path: Path,
) -> None:
    """Real process: acked records, SIGKILL, the segment damaged in the middle and torn at the
    end; the next start becomes ready, delivers the undamaged acked records, quarantines the file.
    """
    state = tmp_path / "state"
    oracle = Oracle()
    first = start_server(state, {"SF_DRAIN_INTERVAL_MS": "3600000"})
    try:
        first.wait_ready()
        assert all(post_one(first, oracle) == 202 for _ in range(6))
    finally:
        first.kill()
        first.close()
    (seg,) = leftovers(state)["log"]
    path = state / "feedback" / seg
    data = bytearray(path.read_bytes())
    frames = scan(bytes(data)).records
    damaged_at = frames[2][0]
    data[damaged_at + 20] ^= 0x10  # payload of the third record
    path.write_bytes(bytes(data) + b"SQ\x01\x00\x10")  # plus a torn tail
    logs = clean_restart(state)
    assert f"corrupt record in {path} at offset {damaged_at}: bad payload checksum" in logs
    verdict = oracle.check(state)
    assert len(verdict.lost) == 1  # exactly the damaged record, on purpose
    assert verdict.left["quarantine"] == [seg]
    assert not verdict.duplicated
    assert not verdict.unknown
    assert not verdict.left["draining"]
