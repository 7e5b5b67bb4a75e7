"""The delivery oracle against real SQLite sinks and queue folders (no server)."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import pytest

from sf_lifecycle import SqliteSink
from sf_lifecycle._ids import new_record_id
from sf_lifecycle.testing import (
    LostWrites,
    assert_delivered_once,
    check_delivery,
    sqlite_sink_ids,
)


def store(state: Path, ids: list[str]) -> None:
    async def go() -> None:
        sink = SqliteSink(state / "feedback.sqlite3")
        try:
            await sink([{"id": i, "ts": 1, "data": {}} for i in ids])
        finally:
            sink.close()

    asyncio.run(go())


def test_all_delivered_once_passes_and_reports(tmp_path: Path) -> None:
    ids = [new_record_id() for _ in range(5)]
    store(tmp_path, ids)
    report = assert_delivered_once(ids + ids[:2], state_dir=tmp_path)  # repeats are one id
    assert report.ok
    assert report.acknowledged == tuple(ids)
    assert sorted(sqlite_sink_ids(tmp_path / "feedback.sqlite3")) == sorted(ids)


def test_failure_names_every_lost_duplicated_unknown_id_and_draining_file(
    tmp_path: Path,
) -> None:
    acked = [new_record_id() for _ in range(4)]
    stranger = new_record_id()
    (tmp_path / "feedback").mkdir()
    (tmp_path / "feedback" / "abc.000001.draining").write_bytes(b"")
    delivered = [acked[0], acked[0], acked[2], stranger]
    with pytest.raises(LostWrites) as caught:
        assert_delivered_once(acked, state_dir=tmp_path, delivered=delivered)
    text = str(caught.value)
    assert f"lost (acknowledged, never delivered): 2: {acked[1]}, {acked[3]}" in text
    assert f"duplicated (delivered more than once): 1: {acked[0]} x2" in text
    assert f"unknown (delivered, never acknowledged): 1: {stranger}" in text
    assert "left in .draining (not delivered yet): 1: abc.000001.draining" in text
    assert isinstance(caught.value, AssertionError)
    again = pickle.loads(pickle.dumps(caught.value))
    assert again.report == caught.value.report
    assert str(again) == text


def test_unacknowledged_allowance_covers_a_write_in_flight_at_a_kill(tmp_path: Path) -> None:
    acked = [new_record_id()]
    in_flight = new_record_id()
    assert check_delivery(acked, delivered=[*acked, in_flight], unacknowledged=1).ok
    assert not check_delivery(acked, delivered=[*acked, in_flight]).ok
    assert not check_delivery(acked, delivered=[], unacknowledged=1).ok


def test_long_lists_are_cut_and_a_missing_sink_means_nothing_delivered(tmp_path: Path) -> None:
    acked = [new_record_id() for _ in range(60)]
    report = check_delivery(acked, state_dir=tmp_path)
    assert report.lost == tuple(acked)
    assert "lost (acknowledged, never delivered): 60: " in report.describe()
    assert "... and 10 more" in report.describe()
    with pytest.raises(ValueError, match="state_dir"):
        check_delivery(acked)
