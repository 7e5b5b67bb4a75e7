"""One watcher per session per process: shared by every stream, read once, closed with the last.

Both ways of seeing another process's appends are exercised: inotify (`watch="inotify"`) and
the polling fallback (`watch="poll"`). The other process is a real one (`python -c`), appending
to the same state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from sf_lifecycle._events import LOST, MAX_BATCH, Event, follow, follow_batches, parse_event_id
from sf_lifecycle._events_file import FileEventLog
from sf_lifecycle._inotify import IN_MODIFY, IN_Q_OVERFLOW, Inotify, parse
from sf_lifecycle._sessiondisk import SessionDisk

MODES = ["inotify", "poll"]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def inotify_fd_set() -> set[int]:
    """The inotify descriptors open in this process, by number."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                out.add(int(fd))
    return out


class InotifyFds:
    """This test's own inotify descriptors: those open now that were not at the start.

    Other tests in the same worker process may have left logs to the garbage collector; they
    are collected first, and whatever is still open then is not counted.
    """

    def __init__(self) -> None:
        gc.collect()
        self.before = inotify_fd_set()

    def new(self) -> int:
        return len(inotify_fd_set() - self.before)

    async def closed(self) -> int:
        """`new()` once it is 0 (a log closes its descriptor on a worker thread), or after 5 s."""
        for _ in range(500):
            if self.new() == 0:
                break
            await asyncio.sleep(0.01)
        return self.new()


async def fds_back_to(n: int) -> int:
    """The descriptor count once it is back to `n` (the inotify one closes on a worker thread),
    or after 5 s."""
    for _ in range(500):
        if fd_count() == n:
            break
        await asyncio.sleep(0.01)
    return fd_count()


def watch_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("sf-session-watch-")]


def append_from_another_process(state_dir: Path, session: str, n: int) -> None:
    code = (
        "import asyncio, sys\n"
        "from sf_lifecycle import FileEventLog\n"
        "async def main():\n"
        "    log = FileEventLog(sys.argv[1])\n"
        "    for i in range(int(sys.argv[3])):\n"
        "        await log.append(sys.argv[2], {'from': 'other', 'i': i})\n"
        "asyncio.run(main())\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(state_dir), session, str(n)], check=True, timeout=30
    )


class Follower:
    """A stream: follows `session` in a task, keeps every event it is given."""

    def __init__(self, log: FileEventLog, session: str, last_id: str | None = None) -> None:
        self.events: list[Event] = []
        self.changed = asyncio.Event()
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self._run(log, session, last_id))

    async def _run(self, log: FileEventLog, session: str, last_id: str | None) -> None:
        async for event in follow(log, session, last_id, until=self.stop):
            self.events.append(event)
            self.changed.set()

    async def until_count(self, n: int) -> None:
        async with asyncio.timeout(10):
            while len(self.events) < n:
                self.changed.clear()
                await self.changed.wait()

    @property
    def ids(self) -> list[str | None]:
        return [e.id for e in self.events]


async def settle(log: FileEventLog, session: str, refs: int) -> None:
    """Until `refs` streams hold the session's watcher (each has done its first read)."""
    for _ in range(1000):
        if log.watching().get(session) == refs:
            break
        await asyncio.sleep(0.01)
    assert log.watching().get(session) == refs
    await asyncio.sleep(0.05)


@pytest.mark.parametrize("mode", MODES)
async def test_every_stream_of_a_session_shares_one_watcher_that_reads_the_file_once(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps: 50 streams follow one session and get its first event; another process appends
    3 events: every stream gets exactly those 3, in order; only the session's watcher looked at
    the file (no stream did); one inotify descriptor in inotify mode, none when polling."""
    ours = InotifyFds()
    log = FileEventLog(tmp_path, poll_ms=20, watch=mode)
    first = await log.append("s", "before")
    streams = [Follower(log, "s") for _ in range(50)]
    for f in streams:
        await f.until_count(1)
    assert log.watching() == {"s": 50}
    assert ours.new() == (1 if mode == "inotify" else 0)

    by_streams = 0
    real_stale = SessionDisk.stale

    def counting_stale(self: SessionDisk, s: object) -> bool:
        nonlocal by_streams
        task = asyncio.current_task()
        if task is None or not task.get_name().startswith("sf-session-watch-"):
            by_streams += 1
        return real_stale(self, s)  # type: ignore[arg-type]

    monkeypatch.setattr(SessionDisk, "stale", counting_stale)
    await asyncio.to_thread(append_from_another_process, tmp_path, "s", 3)
    for f in streams:
        await f.until_count(4)
    await asyncio.sleep(0.1)  # anything more (a duplicate) would arrive now
    # Before: every stream stat()ed (and header-checked) the file on each wake, 50+ here.
    assert by_streams == 0
    expected = [first, *[e.id for e in await log.read_after("s", first)]]
    assert len(expected) == 4
    assert all(f.ids == expected for f in streams)
    assert [e.data for e in streams[0].events[1:]] == [{"from": "other", "i": i} for i in range(3)]

    for f in streams:
        f.stop.set()
    await asyncio.gather(*(f.task for f in streams))
    assert log.watching() == {}
    assert ours.new() == (1 if mode == "inotify" else 0)  # one per log, until aclose()
    await log.aclose()
    assert await ours.closed() == 0


@pytest.mark.parametrize("mode", MODES)
async def test_1000_streams_opened_and_closed_leave_no_fd_task_or_watcher(
    tmp_path: Path, mode: str
) -> None:
    """Steps: 1,000 streams over 20 sessions opened at once, then cancelled (a client that went
    away); then 1,000 opened and ended one after another: no watcher, task or descriptor is
    left, and the log still delivers to a new stream; `aclose()` closes the inotify one."""
    ours = InotifyFds()
    log = FileEventLog(tmp_path, poll_ms=20, watch=mode)
    await log.append("s0", "warm")  # the sessions folder and first file exist: not a leak
    warm = Follower(log, "s0")  # and the log's inotify descriptor, which lives until aclose()
    await warm.until_count(1)
    warm.stop.set()
    await warm.task
    fds = fd_count()
    streams = [Follower(log, f"s{i % 20}") for i in range(1000)]
    for _ in range(2000):
        if sum(log.watching().values()) == 1000:
            break
        await asyncio.sleep(0.01)
    assert len(log.watching()) == 20
    assert len(watch_tasks()) == 20
    assert ours.new() == (1 if mode == "inotify" else 0)
    for f in streams:
        f.task.cancel()
    await asyncio.gather(*(f.task for f in streams), return_exceptions=True)
    await asyncio.sleep(0)
    assert log.watching() == {}
    assert watch_tasks() == []
    assert await fds_back_to(fds) == fds

    for i in range(1000):
        f = Follower(log, f"one{i % 7}")
        await asyncio.sleep(0)
        f.stop.set()
        await f.task
    await asyncio.sleep(0)
    assert log.watching() == {}
    assert watch_tasks() == []
    assert await fds_back_to(fds) == fds

    f = Follower(log, "s0")
    await f.until_count(1)
    await log.append("s0", "live")
    await f.until_count(2)
    assert [e.data for e in f.events] == ["warm", "live"]
    f.stop.set()
    await f.task
    await log.aclose()
    assert await fds_back_to(fds - (1 if mode == "inotify" else 0)) == fds - (mode == "inotify")
    assert ours.new() == 0


async def test_a_stream_that_stops_reading_holds_nothing_up_and_gets_lost_past_retention(
    tmp_path: Path,
) -> None:
    """Steps: two streams on one session with retention 20; one stops reading after its first
    batch; 200 events are appended: the other stream gets all of them in order, in batches of
    at most MAX_BATCH; the stopped one, resumed, gets a `lost` event counting what retention
    dropped, then the retained events, with no gap after the lost event."""
    log = FileEventLog(tmp_path, retention_events=20, watch="poll", poll_ms=20)
    first = await log.append("s", 0)
    slow: AsyncGenerator[list[Event], None] = follow_batches(log, "s", None)
    assert [e.id for e in await anext(slow)] == [first]  # then it stops reading

    fast = Follower(log, "s")
    await fast.until_count(1)
    ids = [await log.append("s", i) for i in range(1, 201)]
    await fast.until_count(201)
    assert fast.ids == [first, *ids]

    batch = await anext(slow)
    assert batch[0].kind == LOST
    assert batch[0].data["reason"] == "expired"
    resume = batch[0].data["resume_after"]
    rest = [e.id for e in batch[1:]]
    while rest[-1] != ids[-1]:
        more = await anext(slow)
        assert len(more) <= MAX_BATCH
        rest += [e.id for e in more]
    # Exactly what a client resuming from the lost event's position is served.
    assert rest == [e.id for e in await log.read_after("s", resume)]
    assert batch[0].data["lost"] == parse_event_id(resume)[1] - 1
    assert 20 <= len(rest) <= 25
    await slow.aclose()
    fast.stop.set()
    await fast.task
    await log.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_a_stream_sees_the_file_quarantined_by_another_replica_as_a_reset(
    tmp_path: Path, mode: str
) -> None:
    """Steps: a stream follows on replica a; replica b appends 2; the file is overwritten with
    garbage; b appends again (quarantining it, starting a new epoch): the stream gets a `lost`
    event with reason `reset`, then b's new event, with no duplicate."""
    a = FileEventLog(tmp_path, poll_ms=20, watch=mode)
    b = FileEventLog(tmp_path, poll_ms=20, watch="poll")
    f = Follower(a, "s")
    await settle(a, "s", 1)
    old = [await b.append("s", i) for i in range(2)]
    await f.until_count(2)
    (tmp_path / "sessions" / "s.log").write_bytes(b"not a session log\n")
    new = await b.append("s", "after")
    await f.until_count(4)
    assert f.ids[:2] == old
    assert f.events[2].kind == LOST
    assert f.events[2].data["reason"] == "reset"
    assert f.ids[3] == new
    assert parse_event_id(new)[0] != parse_event_id(old[0])[0]
    assert len(list((tmp_path / "sessions").glob("s.corrupt-*"))) == 1
    f.stop.set()
    await f.task
    await a.aclose()
    await b.aclose()


async def test_a_watch_mode_must_be_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="auto, inotify, poll"):
        FileEventLog(tmp_path, watch="fanotify")


def test_inotify_events_are_parsed_from_one_read(tmp_path: Path) -> None:
    """A packed buffer of two events (one named, padded with NULs; one without a name)."""
    name = b"s.log\0\0\0\0\0\0\0\0\0\0\0"
    buf = struct.pack("iIII", 1, IN_MODIFY, 0, len(name)) + name
    buf += struct.pack("iIII", -1, IN_Q_OVERFLOW, 0, 0)
    events = parse(buf)
    assert [(e.wd, e.mask, e.name) for e in events] == [
        (1, IN_MODIFY, b"s.log"),
        (-1, IN_Q_OVERFLOW, b""),
    ]
    ino = Inotify.open()
    try:
        ino.add_watch(tmp_path, IN_MODIFY)
        (tmp_path / "x.log").write_bytes(b"1")
        assert [e.name for e in ino.read()] == [b"x.log"]
        assert ino.read() == []
        with pytest.raises(OSError, match="inotify_add_watch"):
            ino.add_watch(tmp_path / "missing", IN_MODIFY)
    finally:
        ino.close()
    ino.close()  # twice is fine


def test_a_log_never_closed_releases_its_inotify_descriptor_once_collected(tmp_path: Path) -> None:
    """Steps: a log streams a session on its own event loop in inotify mode and is never
    `aclose()`d (the loop just ends, as in a test or a script); once the log is dropped and
    collected, its inotify descriptor is closed: a user may hold only 128 of them
    (`fs.inotify.max_user_instances`), and forgotten logs must not use them up."""
    ours = InotifyFds()

    async def stream_once() -> None:
        log = FileEventLog(tmp_path, watch="inotify")
        await log.append("s", "one")
        f = Follower(log, "s")
        await f.until_count(1)
        assert ours.new() == 1
        f.stop.set()
        await f.task

    asyncio.run(stream_once())
    gc.collect()
    # Before: the descriptor stayed open until the process exited, one more per such log.
    assert ours.new() == 0


NO_CTYPES = (
    "import sys\n"
    "sys.modules['_ctypes'] = None  # a Python built without libffi: import _ctypes fails\n"
)


def test_without_ctypes_the_library_imports_and_auto_polls(tmp_path: Path) -> None:
    """Steps: a Python where `_ctypes` cannot be imported imports sf_lifecycle, follows a
    session with the default `watch="auto"`, and another log appends to it: the stream gets
    the event (by polling), and one warning says inotify is unavailable."""
    code = NO_CTYPES + (
        "import asyncio, logging\n"
        "from sf_lifecycle import FileEventLog\n"
        "from sf_lifecycle._events import follow\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "async def main():\n"
        "    a, b = FileEventLog(sys.argv[1], poll_ms=20), FileEventLog(sys.argv[1])\n"
        "    got = []\n"
        "    async def read():\n"
        "        async for e in follow(a, 's', None):\n"
        "            got.append(e.data)\n"
        "            if len(got) == 2: return\n"
        "    t = asyncio.create_task(read())\n"
        "    await b.append('s', 'one')\n"
        "    await asyncio.sleep(0.2)\n"
        "    await b.append('s', 'two')\n"
        "    await asyncio.wait_for(t, 10)\n"
        "    print(got)\n"
        "asyncio.run(main())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    # Before: `import sf_lifecycle` failed (ModuleNotFoundError: import of _ctypes halted).
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['one', 'two']"
    warnings = [line for line in r.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert "inotify unavailable" in warnings[0]
    assert "ctypes" in warnings[0]


def test_without_ctypes_watch_inotify_is_a_config_error_naming_sf_sse_watch(
    tmp_path: Path,
) -> None:
    """Steps: a Python without `_ctypes`, `SF_SSE_WATCH=inotify`: building the log from the
    settings raises `ConfigError` naming `SF_SSE_WATCH` and the settings that work instead."""
    code = NO_CTYPES + (
        "from sf_lifecycle import ConfigError, FileEventLog, Settings\n"
        "s = Settings.from_env({'SF_STATE_DIR': sys.argv[1], 'SF_SSE_WATCH': 'inotify'})\n"
        "try:\n"
        "    FileEventLog.from_settings(s)\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("invalid SF_SSE_WATCH='inotify': inotify cannot be used here")
    assert "SF_SSE_WATCH=auto or poll" in r.stdout


async def test_a_subscription_read_is_at_most_limit_events_a_lost_one_included(
    tmp_path: Path,
) -> None:
    """Steps: retention 10, 30 events; a subscription reads from the first one (expired) with
    `limit=5`: 5 events, the `lost` one first then 4 retained; reading on from there gives
    the rest in order, with no gap."""
    log = FileEventLog(tmp_path, retention_events=10, watch="poll")
    ids = [await log.append("s", i) for i in range(30)]
    sub = log.subscribe("s")
    try:
        batch = await sub.read_after(ids[0], 5)
        # Before: 6 (the lost event, then `limit` more), over a stream's batch bound.
        assert len(batch) == 5
        assert batch[0].kind == LOST
        assert [e.id for e in batch[1:]] == ids[20:24]
        rest = await sub.read_after(batch[-1].id, 64)
        assert [e.id for e in rest] == ids[24:]
        assert len(await sub.read_after(ids[0], 1)) == 1  # just the lost event
    finally:
        sub.close()
        await log.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_the_recheck_of_watched_files_stats_nothing_on_the_event_loop(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps: 200 sessions followed, one stream each; for 2.5 s (two inotify safety rechecks,
    many polls) nothing is appended: no `stat` runs on the event loop's thread (10,000
    sessions would be 10,000 a second there); then another process appends to one session,
    and its stream gets the event."""
    log = FileEventLog(tmp_path, poll_ms=50, watch=mode)
    for i in range(200):
        await log.append(f"s{i}", "first")
    streams = [Follower(log, f"s{i}") for i in range(200)]
    for f in streams:
        await f.until_count(1)
    await asyncio.sleep(1.5)  # the files are older than a clock tick: a stat is trusted
    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    real_stat = os.stat

    def recording_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if threading.get_ident() == loop_thread:
            on_loop.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", recording_stat)
    await asyncio.sleep(2.5)
    # Before: every watched session stat()ed its file on the loop every second (every poll).
    assert on_loop == []
    monkeypatch.undo()
    await asyncio.to_thread(append_from_another_process, tmp_path, "s7", 1)
    await streams[7].until_count(2)
    assert streams[7].events[1].data == {"from": "other", "i": 0}
    for f in streams:
        f.stop.set()
    await asyncio.gather(*(f.task for f in streams))
    await log.aclose()
