"""Session event log: ids, resume, retention, two replicas on one store, corruption.

The tests before the file-specific ones run against every backend (`make_log`): the file log on
a temporary directory, `RedisEventLog` on a real redis-server (`sf_redis`), each test with its
own key prefix, and `PostgresEventLog` on a real PostgreSQL (`sf_postgres`), each test with its
own database and each log with its own pool (two logs: two replicas).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sf_lifecycle._events import (
    LOST,
    Event,
    EventLog,
    InvalidEventId,
    InvalidSessionId,
    follow,
    parse_event_id,
    validate_session_id,
)
from sf_lifecycle._events_file import FileEventLog
from sf_lifecycle._events_redis import RedisEventLog
from sf_lifecycle.postgres import Database, PostgresEventLog
from sf_lifecycle.testing import PostgresServer, RedisServer

AnyLog = FileEventLog | RedisEventLog | PostgresEventLog
LogFactory = Callable[..., AnyLog]


@pytest.fixture(params=["file", "redis", "postgres"])
async def make_log(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LogFactory]:
    """Factory of logs of one backend; two logs it makes share a store, like two replicas."""
    logs: list[AnyLog] = []
    dbs: list[Database] = []
    server: RedisServer | None = None
    pg_url: str | None = None
    if request.param == "redis":
        server = request.getfixturevalue("sf_redis")
    elif request.param == "postgres":
        pg: PostgresServer = request.getfixturevalue("sf_postgres")
        pg_url = pg.create_database("ev")
    prefix = f"t-{uuid.uuid4().hex[:12]}:"

    def make(**kwargs: Any) -> AnyLog:
        log: AnyLog
        if pg_url is not None:
            dbs.append(Database(pg_url))
            log = PostgresEventLog(dbs[-1], **kwargs)
        elif server is None:
            log = FileEventLog(tmp_path, **kwargs)
        else:
            log = RedisEventLog(server.url, key_prefix=prefix, **kwargs)
        logs.append(log)
        return log

    yield make
    for log in logs:
        await log.aclose()
    for db in dbs:
        await db.close()


def seqs(events: list[Event]) -> list[int]:
    return [parse_event_id(e.id)[1] for e in events if e.id is not None and e.kind != LOST]


async def fill(log: EventLog, session: str, n: int) -> list[str]:
    return [await log.append(session, {"n": i}) for i in range(1, n + 1)]


async def test_ids_are_dense_and_strictly_increasing(make_log: LogFactory) -> None:
    log = make_log()
    ids = await fill(log, "s1", 25)
    parsed = [parse_event_id(i) for i in ids]
    assert {e for e, _ in parsed} == {parsed[0][0]}
    assert [s for _, s in parsed] == list(range(1, 26))
    assert parsed == sorted(parsed)
    # Sessions number independently.
    other = await log.append("s2", "x")
    assert parse_event_id(other)[1] == 1
    assert isinstance(log, EventLog)


async def test_resume_from_every_position(make_log: LogFactory) -> None:
    log = make_log()
    ids = await fill(log, "s", 12)
    for k in range(len(ids) + 1):
        after = None if k == 0 else ids[k - 1]
        got = await log.read_after("s", after)
        assert [e.id for e in got] == ids[k:], k
        assert [e.data for e in got] == [{"n": i} for i in range(k + 1, 13)]


async def test_retention_by_count_reports_exactly_what_was_lost(make_log: LogFactory) -> None:
    log = make_log(retention_events=5)
    ids = await fill(log, "s", 12)
    epoch = parse_event_id(ids[0])[0]
    # A new client gets the retained window, with no notice.
    assert seqs(await log.read_after("s", None)) == [8, 9, 10, 11, 12]
    # Resuming from seq 3: seqs 4..7 are gone, and the notice says so.
    got = await log.read_after("s", ids[2])
    assert got[0].kind == LOST
    assert got[0].id == f"{epoch}-7"
    assert got[0].data == {
        "reason": "expired",
        "last_event_id": ids[2],
        "resume_after": f"{epoch}-7",
        "lost": 4,
    }
    assert seqs(got) == [8, 9, 10, 11, 12]
    # The edge: resuming from the newest expired id loses nothing.
    got = await log.read_after("s", ids[6])
    assert [e.kind for e in got] == ["message"] * 5
    # Resuming from the lost event's id continues without a second notice.
    got = await log.read_after("s", f"{epoch}-7")
    assert seqs(got) == [8, 9, 10, 11, 12]
    assert got[0].kind != LOST


async def test_file_compaction_keeps_the_file_bounded(tmp_path: Path) -> None:
    log = FileEventLog(tmp_path, retention_events=5)
    await fill(log, "s", 12)
    # Retention + 25 % slack, at least 1.
    lines = (tmp_path / "sessions" / "s.log").read_text().splitlines()
    assert len(lines) - 1 <= 5 + 1
    assert json.loads(lines[0])["floor"] >= 6


async def test_retention_by_age(make_log: LogFactory) -> None:
    log = make_log(retention_ms=300)
    ids = await fill(log, "s", 3)
    await asyncio.sleep(0.4)
    fresh = await log.append("s", "fresh")
    got = await log.read_after("s", ids[0])
    assert got[0].kind == LOST
    assert got[0].data["lost"] == 2
    assert [e.id for e in got[1:]] == [fresh]
    # An id from after the expiry is fine.
    assert [e.id for e in await log.read_after("s", ids[2])] == [fresh]


async def test_other_epoch_and_future_ids_get_a_lost_event(make_log: LogFactory) -> None:
    log = make_log()
    ids = await fill(log, "s", 3)
    epoch = parse_event_id(ids[0])[0]
    got = await log.read_after("s", f"{epoch - 5}-2")
    assert got[0].kind == LOST
    assert got[0].data["reason"] == "reset"
    assert got[0].data["lost"] is None
    assert [e.id for e in got[1:]] == ids
    got = await log.read_after("s", f"{epoch}-99")
    assert len(got) == 1
    assert got[0].data["reason"] == "ahead"
    assert got[0].id == ids[-1]
    # A session with no log at all, asked from an id: the notice, no id to move to.
    got = await log.read_after("nobody", ids[0])
    assert len(got) == 1
    assert got[0].kind == LOST
    assert got[0].id is None
    assert await log.read_after("nobody", None) == []


async def test_two_instances_on_one_store_act_like_two_replicas(make_log: LogFactory) -> None:
    a, b = make_log(), make_log()
    ids = []
    for i in range(10):
        ids.append(await (a if i % 2 else b).append("s", i))
    assert [parse_event_id(x)[1] for x in ids] == list(range(1, 11))
    assert [e.id for e in await a.read_after("s", None)] == ids
    assert [e.id for e in await b.read_after("s", ids[3])] == ids[4:]
    # Concurrent appends from both "replicas" never reuse a number.
    more = await asyncio.gather(*((a if i % 2 else b).append("s", i) for i in range(40)))
    assert sorted(parse_event_id(x)[1] for x in more) == list(range(11, 51))
    assert seqs(await a.read_after("s", None)) == list(range(1, 51))
    assert seqs(await b.read_after("s", None)) == list(range(1, 51))


async def test_wait_wakes_on_another_instances_append(make_log: LogFactory) -> None:
    a, b = make_log(), make_log()
    first = await a.append("s", 0)
    assert await b.read_after("s", first) == []
    assert await b.wait("s", first, 0.1) is False  # nothing new: times out

    async def later() -> str:
        await asyncio.sleep(0.1)
        return await a.append("s", 1)

    task = asyncio.create_task(later())
    began = time.monotonic()
    assert await b.wait("s", first, 5.0) is True
    waited = time.monotonic() - began
    second = await task
    assert 0.08 <= waited < 1.0
    assert [e.id for e in await b.read_after("s", first)] == [second]
    await a.aclose()
    await b.aclose()


async def test_follow_replays_then_streams_live(make_log: LogFactory) -> None:
    log = make_log()
    ids = await fill(log, "s", 3)
    seen: list[str | None] = []

    async def consume() -> None:
        async for event in follow(log, "s", ids[0]):
            seen.append(event.id)
            if len(seen) == 4:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    live = [await log.append("s", "a"), await log.append("s", "b")]
    await asyncio.wait_for(task, 5)
    assert seen == [*ids[1:], *live]
    await log.aclose()


async def test_follow_ends_once_until_is_set_while_waiting_and_between_events(
    make_log: LogFactory,
) -> None:
    """Steps: follow with an `until` flag; it yields the backlog, waits; the flag is set: the
    iteration ends at once (not after `idle_s`), with nothing more yielded; a second follow
    whose flag is set mid-batch stops before the next event."""
    log = make_log()
    ids = await fill(log, "s", 3)
    until = asyncio.Event()
    seen: list[str | None] = []

    async def consume() -> None:
        async for event in follow(log, "s", None, idle_s=30, until=until):
            seen.append(event.id)

    task = asyncio.create_task(consume())
    for _ in range(200):
        if len(seen) == 3:
            break
        await asyncio.sleep(0.01)
    assert seen == ids
    began = time.monotonic()
    until.set()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - began < 1  # not the 30 s idle wait
    await log.append("s", "after")
    assert seen == ids

    stop = asyncio.Event()
    got: list[str | None] = []
    async for event in follow(log, "s", None, until=stop):
        got.append(event.id)
        if len(got) == 2:
            stop.set()
    assert got == ids[:2]
    await log.aclose()


async def test_corrupt_file_is_quarantined_and_a_new_epoch_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = FileEventLog(tmp_path)
    ids = await fill(log, "s", 3)
    path = tmp_path / "sessions" / "s.log"
    lines = path.read_bytes().split(b"\n")
    lines[2] = b'{"seq":2,"ts":1,"data":{oops}'
    path.write_bytes(b"\n".join(lines))
    fresh = FileEventLog(tmp_path)  # another replica reading it from scratch
    with caplog.at_level(logging.ERROR, logger="sf_lifecycle.events"):
        got = await fresh.read_after("s", ids[0])
    assert [e.kind for e in got] == [LOST]
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    quarantined = list((tmp_path / "sessions").glob("s.corrupt-*"))
    assert len(quarantined) == 1
    assert not path.exists()
    new_id = await fresh.append("s", "after")
    assert parse_event_id(new_id) > parse_event_id(ids[-1])
    # A client with an old id is told about the reset, then gets the new events.
    got = await fresh.read_after("s", ids[-1])
    assert got[0].kind == LOST
    assert got[0].data["reason"] == "reset"
    assert [e.id for e in got[1:]] == [new_id]


async def test_garbage_header_is_quarantined(tmp_path: Path) -> None:
    (tmp_path / "sessions").mkdir()
    (tmp_path / "sessions" / "s.log").write_bytes(b"\xff\xfe not a log\n")
    log = FileEventLog(tmp_path)
    assert await log.read_after("s", None) == []
    assert len(list((tmp_path / "sessions").glob("s.corrupt-*"))) == 1
    assert parse_event_id(await log.append("s", 1))[1] == 1


async def test_torn_last_line_is_ignored_then_truncated(tmp_path: Path) -> None:
    log = FileEventLog(tmp_path)
    ids = await fill(log, "s", 2)
    path = tmp_path / "sessions" / "s.log"
    with path.open("ab") as f:
        f.write(b'{"seq":3,"ts":1,"da')  # a writer killed mid-write
    other = FileEventLog(tmp_path)
    assert [e.id for e in await other.read_after("s", None)] == ids
    third = await other.append("s", "next")
    assert parse_event_id(third)[1] == 3
    assert [e.id for e in await log.read_after("s", None)] == [*ids, third]
    assert not list((tmp_path / "sessions").glob("*.corrupt-*"))


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "a.b", "x" * 129, "sp ace", "é", "a\x00"])
def test_invalid_session_ids_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidSessionId):
        validate_session_id(bad)


async def test_invalid_ids_rejected_by_the_log(tmp_path: Path) -> None:
    log = FileEventLog(tmp_path)
    with pytest.raises(InvalidSessionId):
        await log.append("../../x", 1)
    with pytest.raises(InvalidEventId):
        await log.read_after("s", "12")
    with pytest.raises(ValueError, match="JSON"):
        await log.append("s", float("nan"))
    assert validate_session_id("A-z_09") == "A-z_09"
    assert not (tmp_path / "x").exists()


def test_from_settings(tmp_path: Path) -> None:
    from sf_lifecycle import Settings

    log = FileEventLog.from_settings(
        Settings(state_dir=tmp_path, sse_retention_events=7, sse_retention_ms=9_000)
    )
    assert (log.dir, log.retention_events, log.retention_ms) == (tmp_path / "sessions", 7, 9_000)


def _replace_reusing_the_inode(real: object) -> object:
    """`os.replace` as ext4 often behaves after a compaction: the new file gets the old inode.

    The temp file's bytes are written into the inode the destination name already has, so a
    peer that identifies the file by inode number sees "the same file" with other content.
    """
    replace = real

    def fake(src: object, dst: object, *args: object, **kwargs: object) -> None:
        src_name, dst_name = str(src), str(dst)
        if not dst_name.endswith(".log") or not src_name.endswith(".log.tmp"):
            replace(src, dst, *args, **kwargs)  # type: ignore[operator]
            return
        sfd = kwargs.get("src_dir_fd")
        dfd = kwargs.get("dst_dir_fd")
        try:
            os.stat(dst_name, dir_fd=dfd)  # type: ignore[arg-type]
        except FileNotFoundError:
            replace(src, dst, *args, **kwargs)  # type: ignore[operator]
            return
        with open(os.open(src_name, os.O_RDONLY, dir_fd=sfd), "rb") as f:  # type: ignore[arg-type]
            blob = f.read()
        fd = os.open(dst_name, os.O_WRONLY | os.O_TRUNC, dir_fd=dfd)  # type: ignore[arg-type]
        try:
            os.write(fd, blob)
        finally:
            os.close(fd)
        os.unlink(src_name, dir_fd=sfd)  # type: ignore[arg-type]

    return fake


@pytest.mark.parametrize("every", [1, 2, 3])
async def test_a_reader_never_trusts_an_offset_after_compaction_reused_the_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, every: int
) -> None:
    """Issue 11, defect 5. Steps: writer and reader are two instances (two replicas) on one
    directory with `retention_events=4`, so the writer compacts every few appends, and every
    compaction keeps the inode number (forced, as ext4 does by chance); the reader resumes from
    its cursor after every `every` appends. It gets every event once, in order, and no log is
    quarantined."""
    monkeypatch.setattr(os, "replace", _replace_reusing_the_inode(os.replace))
    writer = FileEventLog(tmp_path, retention_events=4)
    reader = FileEventLog(tmp_path, retention_events=4)
    sent: list[str] = []
    got: list[Event] = []
    cursor: str | None = None
    inodes = set()
    for n in range(60):
        sent.append(await writer.append("s", {"n": n, "pad": "x" * (n * 7 % 23)}))
        inodes.add(os.stat(tmp_path / "sessions" / "s.log").st_ino)
        if n % every == every - 1:
            batch = await reader.read_after("s", cursor)
            got.extend(batch)
            cursor = batch[-1].id if batch else cursor
    got.extend(await reader.read_after("s", cursor))
    assert [e.kind for e in got] == ["message"] * len(sent)
    assert [e.id for e in got] == sent
    assert [e.data["n"] for e in got] == list(range(60))
    assert not [p.name for p in (tmp_path / "sessions").iterdir() if ".corrupt-" in p.name]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(inodes) == 1  # the seam worked: one inode number all along


def _plant(path: Path, kind: str) -> None:
    import socket

    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link":
        path.symlink_to(path.parent.parent / "outside")
    else:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))


@pytest.mark.parametrize(
    ("suffix", "kind"),
    [
        (".log", "folder"),
        (".log", "socket"),
        (".lock", "folder"),
        (".lock", "socket"),
        (".lock", "link"),
        (".log.tmp", "folder"),
        (".log.tmp", "link"),
    ],
)
async def test_a_non_regular_entry_under_a_session_name_is_moved_aside(
    tmp_path: Path, suffix: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Publishing and reading work; the entry is renamed `<name>.corrupt-<ms>` (never followed,
    never deleted) with an error log naming it."""
    log = FileEventLog(tmp_path, retention_events=1)  # compaction writes the .log.tmp
    sessions = tmp_path / "sessions"
    (tmp_path / "outside").write_text("untouched")
    _plant(sessions / f"s1{suffix}", kind)
    ids = [await log.append("s1", {"i": i}) for i in range(3)]
    assert [e.id for e in await log.read_after("s1", None)] == ids[-1:]
    await log.aclose()
    [aside] = [p for p in sessions.iterdir() if p.name.startswith(f"s1{suffix}.corrupt-")] or [
        p for p in sessions.iterdir() if suffix == ".log" and p.name.startswith("s1.corrupt-")
    ]
    assert aside.is_symlink() if kind == "link" else aside.exists()
    assert not aside.is_file() or aside.is_symlink()
    assert aside.name in caplog.text
    assert (tmp_path / "outside").read_text() == "untouched"
