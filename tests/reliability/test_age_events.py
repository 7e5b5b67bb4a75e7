"""Issue 11, the age class for the session event log: a state directory that looks old.

Ids are `<epoch>-<seq>`, each at most 18 digits. A long-lived replica must never reach a
ceiling: files written long ago (ms epoch near 0), epochs and sequence numbers at the id width,
and numbers crossing a digit boundary all keep resume exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sf_lifecycle._events import LOST, parse_event_id
from sf_lifecycle._events_file import FileEventLog

MAX = 10**18 - 1


def old_log(state: Path, session: str, epoch: int, seqs: list[int], ts: int, floor: int) -> None:
    """A log as an older replica (or another version) left it: no `gen` in the header."""
    d = state / "sessions"
    d.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"sf_session_log": 1, "epoch": epoch, "floor": floor})]
    lines += [f'{{"seq":{s},"ts":{ts},"data":{{"s":{s}}}}}' for s in seqs]
    (d / f"{session}.log").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "first",
    [1, 9, 99_999, 999_999, 999_999_999, 10**15 - 2, MAX - 8],
    ids=lambda n: f"seq{n}",
)
async def test_sequence_numbers_across_digit_boundaries_resume_exactly(
    tmp_path: Path, first: int
) -> None:
    """Steps: a log whose sequence is at `first` (written by a replica that ran for years);
    append until the count crosses a digit boundary; a reader from every position gets exactly
    the events after it; a second instance (another replica) reads the same."""
    epoch = 1_700_000_000_000
    old_log(tmp_path, "s", epoch, [first, first + 1], ts=10**13, floor=first - 1)
    log = FileEventLog(tmp_path, retention_events=100)
    ids = [f"{epoch}-{first}", f"{epoch}-{first + 1}"]
    for i in range(6):
        ids.append(await log.append("s", {"s": first + 2 + i}))
    assert [parse_event_id(i)[1] for i in ids] == list(range(first, first + 8))
    other = FileEventLog(tmp_path, retention_events=100)
    for k in range(len(ids)):
        for reader in (log, other):
            got = await reader.read_after("s", ids[k])
            assert [e.id for e in got] == ids[k + 1 :]
    assert not list((tmp_path / "sessions").glob("*.corrupt-*"))


async def test_an_epoch_at_the_id_width_still_resumes_and_a_new_epoch_stays_parseable(
    tmp_path: Path,
) -> None:
    """Steps: a log whose epoch is the largest an id can carry (a clock once far ahead);
    resume from it works; after the file is lost, the new epoch is a valid id again (not 19
    digits), and the old id gets a `reset` event, not a 400."""
    old_log(tmp_path, "e", MAX, [1, 2, 3], ts=10**13, floor=0)
    log = FileEventLog(tmp_path)
    got = await log.read_after("e", f"{MAX}-1")
    assert [e.id for e in got] == [f"{MAX}-2", f"{MAX}-3"]
    assert await log.append("e", 4) == f"{MAX}-4"
    (tmp_path / "sessions" / "e.log").unlink()
    new = await log.append("e", 5)
    epoch, seq = parse_event_id(new)  # parseable: 18 digits at most
    assert (seq, len(str(epoch)) <= 18, epoch != MAX) == (1, True, True)
    lost = await log.read_after("e", f"{MAX}-4")
    assert (lost[0].kind, lost[0].data["reason"]) == (LOST, "reset")
    assert lost[1].id == new


async def test_a_file_from_long_ago_reports_expiry_exactly_and_is_compacted(
    tmp_path: Path,
) -> None:
    """Steps: a log written in 1970 (epoch and timestamps near 0), from a version without
    `gen`; a reader gets a `lost` event counting every expired event; the next append compacts
    the file, and a reader resumes exactly after it."""
    old_log(tmp_path, "o", 1, list(range(1, 11)), ts=5, floor=0)
    log = FileEventLog(tmp_path, retention_ms=60_000)
    got = await log.read_after("o", "1-3")
    assert (got[0].kind, got[0].data["lost"], got[0].id) == (LOST, 7, "1-10")
    assert got[1:] == []
    new = await log.append("o", "now")
    assert new == "1-11"
    header = json.loads((tmp_path / "sessions" / "o.log").read_text().splitlines()[0])
    assert (header["floor"], isinstance(header["gen"], str)) == (10, True)
    assert [e.id for e in await FileEventLog(tmp_path).read_after("o", "1-10")] == [new]


@pytest.mark.parametrize("bad", [f"{MAX + 1}-1", f"1-{MAX + 1}", "0" * 19 + "-1"])
def test_ids_past_the_width_are_refused_clearly(bad: str) -> None:
    with pytest.raises(ValueError, match="expected <epoch>-<seq>"):
        parse_event_id(bad)


async def test_a_sequence_at_the_id_width_continues_in_a_new_epoch(tmp_path: Path) -> None:
    """Steps: a log whose last seq is the largest an id can carry; the next append starts a
    new epoch at seq 1 (still a valid id); a reader at the old last id gets a `reset` event and
    then the new event, nothing is quarantined."""
    old_log(tmp_path, "w", 1_700_000_000_000, [MAX - 1, MAX], ts=10**13, floor=MAX - 2)
    log = FileEventLog(tmp_path)
    new = await log.append("w", "next")
    epoch, seq = parse_event_id(new)
    assert (seq, epoch > 1_700_000_000_000) == (1, True)
    got = await FileEventLog(tmp_path).read_after("w", f"1700000000000-{MAX}")
    assert [(e.kind, e.id) for e in got][1:] == [("message", new)]
    assert got[0].data["reason"] == "reset"
    assert not list((tmp_path / "sessions").glob("*.corrupt-*"))
