"""FeedbackQueue: append, drain, recovery, quarantine, group commit and disk faults."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import stat
import tempfile
import threading
import time
import types
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sf_lifecycle import _fs
from sf_lifecycle._config import Settings
from sf_lifecycle._errors import BudgetExceeded, DiskWriteError, QueueError
from sf_lifecycle._framing import encode
from sf_lifecycle._ids import is_record_id, new_record_id
from sf_lifecycle._lifecycle import Lifecycle
from sf_lifecycle._queue import FeedbackQueue


class ListSink:
    """A real in-memory sink: idempotent by id, optionally slow, counts every delivery."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.deliveries: Counter[str] = Counter()
        self.stored: dict[str, Mapping[str, Any]] = {}
        self.calls = 0

    async def __call__(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        for r in records:
            self.deliveries[r["id"]] += 1
            self.stored[r["id"]] = r


def files(q: FeedbackQueue, suffix: str) -> list[str]:
    return sorted(n for n in os.listdir(q.dir) if n.endswith(suffix))


@pytest.fixture
async def q(tmp_path: Path) -> Any:
    queue = FeedbackQueue(tmp_path, batch_records=3)
    yield queue
    if not queue._closed:
        queue._release()


def die(q: FeedbackQueue) -> None:
    """What SIGKILL leaves: files as they are, the flock released by the kernel."""
    q._simulate_crash()


def test_record_ids_are_uuid7_hex_and_time_ordered() -> None:
    ids = [new_record_id() for _ in range(5000)]
    assert all(is_record_id(i) for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert not is_record_id("0" * 32)
    assert not is_record_id(ids[0].upper())
    assert not is_record_id(1)


async def test_append_then_drain_delivers_each_record_once(q: FeedbackQueue) -> None:
    ids = [await q.append({"n": i, "text": "é"}) for i in range(7)]
    assert q.stats().queued == 7
    assert files(q, ".log")
    assert not files(q, ".draining")
    sink = ListSink()
    result = await q.drain(sink)
    assert result.delivered == 7
    assert result.complete
    assert result.files_done == 1
    assert sink.deliveries == Counter(dict.fromkeys(ids, 1))
    assert sink.calls == 3  # batches of 3
    assert sink.stored[ids[1]]["data"] == {"n": 1, "text": "é"}
    assert files(q, ".log") == []
    assert files(q, ".draining") == []
    stats = q.stats()
    assert (stats.queued, stats.draining, stats.delivered) == (0, 0, 7)
    # appends after a drain go to a new segment
    later = await q.append({"n": 99})
    assert files(q, ".log") == [f"{q.token}.000002.log"]
    await q.drain(sink)
    assert sink.deliveries[later] == 1


async def test_append_rejects_nan_and_closed_queue(q: FeedbackQueue) -> None:
    with pytest.raises(ValueError, match="JSON"):
        await q.append({"x": float("nan")})
    await q.close()
    with pytest.raises(QueueError, match="closed"):
        await q.append({"x": 1})


async def test_deadline_stops_the_drain_and_leaves_draining_file(q: FeedbackQueue) -> None:
    ids = [await q.append({"n": i}) for i in range(9)]
    slow = ListSink(delay_s=0.15)
    result = await q.drain(slow, deadline=time.monotonic() + 0.2)
    assert not result.complete
    assert result.files_left == 1
    assert 0 < result.delivered < 9
    assert len(files(q, ".draining")) == 1  # nothing deleted before the sink had it all
    result = await q.drain(ListSink(), deadline=time.monotonic() - 1)  # spent budget
    assert not result.complete
    assert files(q, ".draining")
    fast = ListSink()
    assert (await q.drain(fast)).complete
    assert set(fast.deliveries) == set(ids)
    assert files(q, ".draining") == []


async def test_failing_sink_keeps_the_file_for_a_retry(q: FeedbackQueue) -> None:
    rid = await q.append({"a": 1})

    async def broken(records: Sequence[Mapping[str, Any]]) -> None:
        raise ConnectionError("sink down")

    assert not (await q.drain(broken)).complete
    assert len(files(q, ".draining")) == 1
    sink = ListSink()
    await q.drain(sink)
    assert list(sink.deliveries) == [rid]


async def test_recover_delivers_dead_owner_files_and_never_touches_a_live_one(
    tmp_path: Path,
) -> None:
    dead = FeedbackQueue(tmp_path)
    dead_ids = [await dead.append({"d": i}) for i in range(4)]
    await dead._seal_segment()  # one .draining file ...
    dead_ids.append(await dead.append({"d": "log"}))  # ... and one active .log
    die(dead)
    live = FeedbackQueue(tmp_path)
    live_id = await live.append({"live": True})
    rescuer = FeedbackQueue(tmp_path)
    sink = ListSink()
    result = await rescuer.recover(sink)
    assert result.complete
    assert result.files_done == 2
    assert sink.deliveries == Counter(dict.fromkeys(dead_ids, 1))
    assert rescuer.recovery["state"] == "done"
    remaining = os.listdir(rescuer.dir)
    assert not [n for n in remaining if n.startswith(dead.token)]  # data and lock file gone
    assert [n for n in remaining if n.startswith(live.token)]  # the live owner's untouched
    await live.drain(sink)
    assert sink.deliveries[live_id] == 1
    for queue in (live, rescuer):
        await queue.close()


async def test_two_recoverers_never_deliver_the_same_file(tmp_path: Path) -> None:
    owners = []
    ids = []
    for _ in range(3):
        owner = FeedbackQueue(tmp_path)
        ids += [await owner.append({"i": i}) for i in range(5)]
        die(owner)
        owners.append(owner)
    a, b = FeedbackQueue(tmp_path), FeedbackQueue(tmp_path)
    sink = ListSink(delay_s=0.05)
    ra, rb = await asyncio.gather(a.recover(sink), b.recover(sink))
    assert ra.files_done + rb.files_done == 3
    assert sink.deliveries == Counter(dict.fromkeys(ids, 1))  # no file delivered twice
    for queue in (a, b):
        await queue.close()


async def test_corrupt_record_is_quarantined_and_neighbours_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    q = FeedbackQueue(tmp_path)
    token = "0" * 22
    good = [f'{{"id":"{new_record_id()}","data":{{"n":{i}}}}}'.encode() for i in range(3)]
    bad = encode(b'{"id":"x"}')  # valid frame, invalid id
    blob = encode(good[0]) + b"\xffjunk\xff" + encode(good[1]) + bad + encode(good[2])
    path = q.dir / f"{token}.000001.draining"
    path.write_bytes(blob)
    sink = ListSink()
    with caplog.at_level(logging.WARNING, logger="sf_lifecycle.queue"):
        result = await q.recover(sink)
    assert result.quarantined == 1
    assert result.delivered == 3
    assert not path.exists()
    assert (q.quarantine_dir / path.name).read_bytes() == blob  # kept byte for byte
    text = caplog.text
    assert f"{path} at offset {len(encode(good[0]))}: bad magic" in text
    assert "record without a valid id" in text
    assert q.stats().quarantined == 1
    await q.close()


async def test_torn_tail_is_dropped_not_quarantined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    q = FeedbackQueue(tmp_path)
    rid = new_record_id()
    whole = encode(f'{{"id":"{rid}","data":{{}}}}'.encode())
    torn = encode(b'{"id":"never-acknowledged"}')[:-5]
    (q.dir / f"{'1' * 22}.000001.log").write_bytes(whole + torn)
    sink = ListSink()
    with caplog.at_level(logging.INFO, logger="sf_lifecycle.queue"):
        result = await q.recover(sink)
    assert list(sink.deliveries) == [rid]
    assert result.quarantined == 0
    assert os.listdir(q.quarantine_dir) == []
    assert f"dropped a torn tail of {len(torn)} byte(s) at offset {len(whole)}" in caplog.text
    await q.close()


async def test_group_commit_acknowledges_only_after_the_shared_fsync(
    q: FeedbackQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    await q.append({"warm": 1})  # the new segment's directory fsync is out of the way
    gate = threading.Event()
    entered = threading.Event()
    calls: list[int] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        calls.append(fd)
        entered.set()
        gate.wait(5)
        real_fsync(fd)

    monkeypatch.setattr(_fs, "os", types.SimpleNamespace(**{**vars(os), "fsync": slow_fsync}))
    first = asyncio.ensure_future(q.append({"n": 0}))
    await asyncio.to_thread(entered.wait, 5)
    rest = [asyncio.ensure_future(q.append({"n": i})) for i in range(1, 8)]
    await asyncio.sleep(0.05)
    assert not first.done()
    assert not any(t.done() for t in rest)
    gate.set()
    await asyncio.gather(first, *rest)
    assert len(calls) == 2  # the 7 appends queued during the first fsync shared one


class FaultyOS(types.SimpleNamespace):
    """The `os` module as the queue sees it, with one call failing."""


def faulty_os(name: str, err: int | None, *, short: bool = False, times: int = 1) -> Any:
    real = getattr(os, name)
    state = {"left": times}

    def wrapper(*args: Any) -> Any:
        if state["left"] > 0:
            state["left"] -= 1
            if short:  # write half, report it; the next call gets the error (if any)
                fd, data = args
                n = real(fd, bytes(data[: max(1, len(data) // 2)]))
                if err is not None:
                    state["left"] = 0
                    nonlocal_fail.append(err)
                return n
            raise OSError(err, os.strerror(err or 0))
        if nonlocal_fail and name == "write":
            raise OSError(nonlocal_fail.pop(), "after short write")
        return real(*args)

    nonlocal_fail: list[int] = []
    return FaultyOS(**{**vars(os), name: wrapper})


FAULTS = [
    ("write", errno.ENOSPC, False),
    ("write", errno.EIO, False),
    ("write", errno.EFBIG, False),
    ("write", errno.ENOSPC, True),  # short write, then the disk is full
    ("fsync", errno.EIO, False),
    ("fsync", errno.ENOSPC, False),
    ("open", errno.ENOSPC, False),
]


@pytest.mark.parametrize(("call", "err", "short"), FAULTS)
async def test_disk_fault_is_never_acknowledged_and_queue_stays_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, err: int, short: bool
) -> None:
    q = FeedbackQueue(tmp_path)
    before = [await q.append({"before": i}) for i in range(3)]
    if call == "open":
        await q.drain(ListSink())  # the next append must create a segment
        before = []
    monkeypatch.setattr(_fs, "os", faulty_os(call, err, short=short))
    # What code around `append` catches: a refused write is a QueueError, like a closed queue.
    with pytest.raises(QueueError) as info:
        await q.append({"doomed": True})
    assert isinstance(info.value, DiskWriteError)
    assert info.value.errno == err
    monkeypatch.undo()
    after = await q.append({"after": True})  # usable again, on a fresh segment
    sink = ListSink()
    assert (await q.drain(sink)).complete
    delivered = [r["data"] for r in sink.stored.values()]
    assert {"doomed": True} not in delivered  # the unacknowledged tail was cut
    assert set(sink.deliveries) == {*before, after}
    assert q.stats().quarantined == 0
    await q.close()


async def test_short_write_is_completed_not_failed(
    q: FeedbackQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fs, "os", faulty_os("write", None, short=True))
    rid = await q.append({"long": "x" * 500})
    monkeypatch.undo()
    sink = ListSink()
    await q.drain(sink)
    assert sink.stored[rid]["data"] == {"long": "x" * 500}


async def test_directory_fsync_failure_on_a_new_segment_is_not_acknowledged(
    q: FeedbackQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fsync
    seen: list[int] = []

    def fsync(fd: int) -> None:
        seen.append(fd)
        if len(seen) == 2:  # file fsync passes, directory fsync fails
            raise OSError(errno.EIO, "dir")
        real(fd)

    monkeypatch.setattr(_fs, "os", types.SimpleNamespace(**{**vars(os), "fsync": fsync}))
    with pytest.raises(DiskWriteError):
        await q.append({"x": 1})
    monkeypatch.undo()
    rid = await q.append({"x": 2})
    sink = ListSink()
    await q.drain(sink)
    assert list(sink.deliveries) == [rid]


async def test_explicit_arguments_win_over_settings(tmp_path: Path) -> None:
    """Steps: settings say batches of 7 and 0640 files; the caller passes batches of 3 and
    0600; 7 records drain in 3 sink calls and the queue's files are 0600. What the caller
    left out (`dir_mode`) still comes from the settings. Before issue 15 settings won."""
    cfg = Settings(state_dir=tmp_path, drain_batch_records=7, file_mode=0o640, dir_mode=0o750)
    q = FeedbackQueue(tmp_path / "s", settings=cfg, batch_records=3, file_mode=0o600)
    try:
        for i in range(7):
            await q.append({"i": i})
        modes = {stat.S_IMODE(p.stat().st_mode) for p in q.dir.iterdir() if p.is_file()}
        sink = ListSink()
        assert (await q.drain(sink)).delivered == 7
        assert sink.calls == 3  # 3 + 3 + 1
        assert modes == {0o600}  # the lock and the segment
        assert stat.S_IMODE(q.dir.stat().st_mode) == 0o750
    finally:
        q._release()


async def test_install_recovers_at_startup_and_drains_at_shutdown(tmp_path: Path) -> None:
    old = FeedbackQueue(tmp_path)
    orphan = await old.append({"o": 1})
    die(old)
    cfg = Settings(state_dir=tmp_path, drain_interval_ms=20)
    lifecycle = Lifecycle(cfg)
    q = FeedbackQueue(tmp_path, settings=cfg)
    sink = ListSink()
    q.install(lifecycle, sink)
    await lifecycle.startup()
    for _ in range(100):
        ok, body = await lifecycle.readiness()
        if ok:
            break
        await asyncio.sleep(0.01)
    assert ok, body
    assert body["checks"]["feedback-queue"]["recovery"]["state"] == "done"
    assert sink.deliveries[orphan] == 1
    rid = await q.append({"bg": 1})
    for _ in range(200):  # the background drainer picks it up
        if rid in sink.deliveries:
            break
        await asyncio.sleep(0.01)
    assert sink.deliveries[rid] == 1
    last = await q.append({"last": 1})
    await lifecycle.shutdown()
    assert sink.deliveries[last] == 1
    assert lifecycle.unfinished == []
    # Our lock file is gone too; the idempotency index (probed by readiness) stays.
    left = sorted(n for n in os.listdir(q.dir) if not n.startswith("idempotency.sqlite3"))
    assert left == ["quarantine"]


async def test_close_past_the_deadline_raises_and_keeps_the_records(tmp_path: Path) -> None:
    q = FeedbackQueue(tmp_path)
    q.sink = ListSink()
    rid = await q.append({"x": 1})
    with pytest.raises(BudgetExceeded):
        await q.close(deadline=time.monotonic() - 1)
    assert len(files(q, ".draining")) == 1
    nxt = FeedbackQueue(tmp_path)
    sink = ListSink()
    await nxt.recover(sink)
    assert list(sink.deliveries) == [rid]
    await nxt.close()


async def test_queue_cli_status_and_recover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse
    import json as _json

    from sf_lifecycle import _queue_cli as queue_cli

    def run(*argv: str) -> int:
        parser = argparse.ArgumentParser()
        queue_cli.add_arguments(parser)
        return queue_cli.run(parser.parse_args(argv))

    dead = FeedbackQueue(tmp_path)
    ids = [await dead.append({"i": i}) for i in range(5)]
    die(dead)
    live = FeedbackQueue(tmp_path)
    await live.append({"live": 1})
    (live.quarantine_dir / "old.draining").write_bytes(b"x")
    assert await asyncio.to_thread(run, "status", "--state-dir", str(tmp_path), "--json") == 0
    status = _json.loads(capsys.readouterr().out)
    assert (status["orphaned"], status["queued"], status["quarantined"]) == (5, 1, 1)
    assert status["delivered"] is None
    assert await asyncio.to_thread(run, "recover", "--state-dir", str(tmp_path)) == 0
    err = capsys.readouterr().err
    assert "recovered 5 record(s) from 1 file(s)" in err
    assert "recovering [" in err
    assert await asyncio.to_thread(run, "status", "--state-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "orphaned            0" in out
    assert "delivered           5" in out
    from sf_lifecycle._sink import SqliteSink

    sink = SqliteSink(tmp_path / "feedback.sqlite3")
    assert await sink.ids() == ids
    sink.close()
    assert await asyncio.to_thread(run, "status", "--state-dir", str(tmp_path / "nope")) == 2
    await live.close()


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 6)),
        st.tuples(st.just("drain"), st.just(0)),
        st.tuples(st.just("drain_past_deadline"), st.just(0)),
        st.tuples(st.just("crash"), st.just(0)),
        st.tuples(st.just("recover"), st.just(0)),
    ),
    max_size=12,
)


@settings(max_examples=25, deadline=None)
@given(OPS)
def test_any_history_of_appends_drains_and_crashes_delivers_every_ack(
    ops: list[tuple[str, int]],
) -> None:
    """Whatever happens, a final recovery leaves every acked id in the sink, nothing extra."""

    async def history(state: Path) -> None:
        sink = ListSink()
        acked: list[str] = []
        q = FeedbackQueue(state, batch_records=2)
        for op, n in ops:
            if op == "append":
                acked += [await q.append({"n": i}) for i in range(n)]
            elif op == "drain":
                await q.drain(sink)
            elif op == "drain_past_deadline":
                await q.drain(sink, deadline=time.monotonic() - 1)
            elif op == "crash":
                die(q)
                q = FeedbackQueue(state, batch_records=2)
            else:
                await q.recover(sink)
        die(q)
        final = FeedbackQueue(state)
        assert (await final.recover(sink)).complete
        await final.close()
        assert set(sink.deliveries) == set(acked)
        assert not [n for n in os.listdir(state / "feedback") if n.endswith((".log", ".draining"))]

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(history(Path(d)))


# -- issue 11: names past their width, locks that are not files, recovery that fails ------------


async def test_sequence_past_999999_is_drained_recovered_and_counted(tmp_path: Path) -> None:
    """Segment numbers outgrow six digits after ~55 h of traffic: nothing may go unseen."""
    from sf_lifecycle._queue_cli import inspect_state_dir

    q = FeedbackQueue(tmp_path)
    q._start_segments_after(999_998)
    sink = ListSink()
    acked = []
    for i in range(4):  # segments 999999, 1000000, 1000001, 1000002
        acked.append(await q.append({"i": i}))
        await q.drain(sink)
    assert sink.deliveries == Counter(dict.fromkeys(acked, 1))
    assert files(q, ".log") == files(q, ".draining") == []

    dead = FeedbackQueue(tmp_path)
    dead._start_segments_after(999_997)
    dead_ids = []
    for i in range(4):  # 999998 and 999999 (old width) beside 1000000 and 1000001
        dead_ids.append(await dead.append({"d": i}))
        if i < 3:
            await dead._seal_segment()
    die(dead)
    own = [n for n in os.listdir(dead.dir) if n.startswith(dead.token + ".") and n[-5:] != ".lock"]
    assert sorted(n.split(".")[1] for n in own) == ["1000000", "1000001", "999998", "999999"]
    status = inspect_state_dir(tmp_path)
    assert (status["orphaned"], status["files"]["orphaned"]) == (4, 4)
    result = await q.recover(sink)
    assert result.complete
    assert result.files_done == 4
    assert sink.deliveries == Counter(dict.fromkeys(acked + dead_ids, 1))
    assert not [n for n in os.listdir(q.dir) if n.startswith(dead.token)]
    assert inspect_state_dir(tmp_path)["orphaned"] == 0
    await q.close()
    assert os.listdir(q.dir) == ["quarantine"]


def _spoil_lock(path: Path, kind: str, outside: Path) -> None:
    path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        path.symlink_to(outside)
    else:
        os.mkfifo(path)


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo"])
async def test_a_lock_name_that_is_not_a_regular_file_never_blocks_recovery(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The token is skipped (never followed, never deleted), logged by name; the rest recovers."""
    import json as _json

    state = tmp_path / "state"
    outside = tmp_path / "outside.txt"
    outside.write_text("not the queue's")
    blocked = FeedbackQueue(state)
    blocked_id = await blocked.append({"b": 1})
    die(blocked)
    lock = blocked.dir / f"{blocked.token}.lock"
    _spoil_lock(lock, kind, outside)
    other = FeedbackQueue(state)
    other_id = await other.append({"o": 1})
    die(other)
    cfg = Settings(state_dir=state, orphan_sweep_ms=100)
    rescuer = FeedbackQueue(state, settings=cfg)
    sink = ListSink()
    lifecycle = Lifecycle(cfg)
    rescuer.install(lifecycle, sink)
    await lifecycle.startup()
    try:
        for _ in range(300):
            ok, body = await lifecycle.readiness()
            if ok:
                break
            await asyncio.sleep(0.02)
        assert ok, body
        assert not rescuer.recovering
        assert sink.deliveries == Counter({other_id: 1})  # the rest of recovery completed
        assert f"{blocked.token}.lock" in caplog.text
        assert str(tmp_path) not in _json.dumps(body)  # no absolute path in a probe body
        assert body["checks"]["feedback-queue"]["recovery"]["skipped"] == [f"{blocked.token}.lock"]
        # Untouched: the entry is still what it was, the link target unread and unchanged.
        assert lock.is_symlink() or lock.exists()
        assert outside.read_text() == "not the queue's"
        assert [n for n in os.listdir(rescuer.dir) if n.startswith(blocked.token + ".0")]
        # Once an operator removes the bad entry, the periodic sweep recovers the records.
        if kind == "directory":
            lock.rmdir()
        else:
            lock.unlink()
        for _ in range(300):
            if blocked_id in sink.deliveries:
                break
            await asyncio.sleep(0.02)
        assert sink.deliveries == Counter({other_id: 1, blocked_id: 1})
    finally:
        await lifecycle.shutdown()


async def test_recovery_that_fails_is_retried_and_keyed_posts_wait_for_it(
    tmp_path: Path,
) -> None:
    """A sink failing its first call: ready 503 naming recovery and a keyed POST 503
    "recovering" (the retry is held until then, so it cannot win the race), then ready and the
    first id once the retry worked."""
    import httpx
    from starlette.applications import Starlette

    from sf_lifecycle._feedback import feedback_routes

    first = FeedbackQueue(tmp_path)
    from sf_lifecycle.idempotency import IdempotencyIndex

    index = IdempotencyIndex(first.dir / "idempotency.sqlite3")
    first.add_delivery_listener(index.record_delivered)
    app1 = Starlette(routes=feedback_routes(first, Settings(state_dir=tmp_path), index=index))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app1), base_url="http://t") as c:
        r = await c.post(
            "/api/feedback",
            json={"x": 1},
            headers={"idempotency-key": "k-retry"},
        )
    assert r.status_code == 202
    rid = r.json()["id"]
    die(first)
    index.close()

    retry_may_run = asyncio.Event()

    class FailingOnce(ListSink):
        async def __call__(self, records: Sequence[Mapping[str, Any]]) -> None:
            self.calls += 1
            if self.calls == 1:
                raise OSError(errno.EIO, "the sink is not there yet")
            await retry_may_run.wait()  # the retry waits for the test's 503 checks
            for rec in records:
                self.deliveries[rec["id"]] += 1

    sink = FailingOnce()
    cfg = Settings(state_dir=tmp_path, drain_interval_ms=20)
    lifecycle = Lifecycle(cfg)
    q = FeedbackQueue(tmp_path, settings=cfg)
    q.install(lifecycle, sink)
    app2 = lifecycle.install(Starlette(routes=feedback_routes(q, lifecycle)))
    await lifecycle.startup()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app2), base_url="http://t"
        ) as c:
            seen_503 = False
            for _ in range(600):
                ok, body = await lifecycle.readiness()
                if ok:
                    break
                if sink.calls >= 1 and not seen_503:
                    seen_503 = True
                    assert "feedback-recovery" in body["reason"], body
                    r = await c.post(
                        "/api/feedback", json={"x": 1}, headers={"idempotency-key": "k-retry"}
                    )
                    assert (r.status_code, r.json()["code"]) == (503, "recovering"), r.text
                    retry_may_run.set()
                await asyncio.sleep(0.05)
            assert ok, body
            assert seen_503
            assert sink.deliveries == Counter({rid: 1})
            r = await c.post("/api/feedback", json={"x": 1}, headers={"idempotency-key": "k-retry"})
            assert (r.status_code, r.json()["id"]) == (202, rid)
    finally:
        await lifecycle.shutdown()
    assert sink.deliveries == Counter({rid: 1})


async def test_background_drainer_survives_a_directory_listing_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An OSError while the drainer looks for files is retried next period, never fatal."""
    q = FeedbackQueue(tmp_path, drain_interval_ms=10)
    sink = ListSink()
    failures = {"n": 0}

    def flaky(fd: Any) -> Any:
        if failures["n"] < 3:
            failures["n"] += 1
            raise OSError(errno.EIO, "Input/output error")
        return os.listdir(fd)

    rid = await q.append({"x": 1})
    await q._seal_segment()  # only the directory listing can tell the drainer there is work
    monkeypatch.setattr(_fs, "os", types.SimpleNamespace(**{**vars(os), "listdir": flaky}))
    q.start_drainer(sink)
    for _ in range(300):
        if rid in sink.deliveries:
            break
        await asyncio.sleep(0.01)
    assert sink.deliveries == Counter({rid: 1})
    assert failures["n"] == 3
    assert "background drain failed" in caplog.text
    await q.close()  # the drainer task is alive and stops cleanly


async def test_a_file_that_cannot_be_quarantined_is_kept_and_retried(tmp_path: Path) -> None:
    """Quarantine failing (its folder replaced by a file) leaves the segment; recovery says so."""
    dead = FeedbackQueue(tmp_path)
    rid = await dead.append({"ok": 1})
    die(dead)
    seg = next(p for p in dead.dir.iterdir() if p.name.endswith(".log"))
    with seg.open("ab") as f:
        f.write(encode(b'{"no id": true}') + encode(b"{}"))  # damage: needs quarantine
    rescuer = FeedbackQueue(tmp_path)
    os.rmdir(rescuer.quarantine_dir)
    rescuer.quarantine_dir.write_text("in the way")
    sink = ListSink()
    result = await rescuer.recover(sink)
    assert not result.complete
    assert rescuer.recovery["state"] == "incomplete"
    assert seg.exists()  # kept for the next attempt
    rescuer.quarantine_dir.unlink()
    rescuer.quarantine_dir.mkdir()
    result = await rescuer.recover(sink)
    assert result.complete
    assert result.quarantined == 1
    assert sink.deliveries[rid] >= 1
    assert not seg.exists()
    assert os.listdir(rescuer.quarantine_dir) == [seg.name]
    await rescuer.close()


@pytest.mark.parametrize("holder", ["recoverer", "directory lock"])
async def test_a_keyed_retry_gets_its_id_while_someone_else_holds_the_orphan(
    tmp_path: Path, holder: str
) -> None:
    """Start-up recovery cannot claim a dead owner's file: another process is delivering it
    (`queue recover` with a slow sink, a peer's sweep), or its `.lock` is a directory. The
    keyed retry still gets the original id, and the sink ends with one record for the key.

    Steps: keyed POST, the process dies; the lock is held elsewhere (or spoiled); a new
    replica starts and becomes ready; retry the key (202, same id, replayed); the holder goes
    away, the sweep delivers the file; retry again; one delivery of one id.
    """
    import fcntl

    import httpx
    from starlette.applications import Starlette

    from sf_lifecycle._feedback import feedback_routes
    from sf_lifecycle.idempotency import IdempotencyIndex

    first = FeedbackQueue(tmp_path)
    index = IdempotencyIndex(first.dir / "idempotency.sqlite3")
    first.add_delivery_listener(index.record_delivered)
    app1 = Starlette(routes=feedback_routes(first, Settings(state_dir=tmp_path), index=index))
    key = {"idempotency-key": "k-held"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app1), base_url="http://t") as c:
        r = await c.post("/api/feedback", json={"pay": 1}, headers=key)
    assert r.status_code == 202
    rid = r.json()["id"]
    die(first)
    index.close()
    lock = first.dir / f"{first.token}.lock"
    held_fd = None
    if holder == "recoverer":  # what a recoverer in another process holds while it delivers
        held_fd = os.open(lock, os.O_RDWR)
        fcntl.flock(held_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        lock.unlink()
        lock.mkdir()
    cfg = Settings(state_dir=tmp_path, orphan_sweep_ms=100, drain_interval_ms=20)
    lifecycle = Lifecycle(cfg)
    sink = ListSink()
    q = FeedbackQueue(tmp_path, settings=cfg)
    q.install(lifecycle, sink)
    app2 = lifecycle.install(Starlette(routes=feedback_routes(q, lifecycle)))
    await lifecycle.startup()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app2), base_url="http://t"
        ) as c:
            for _ in range(300):
                ok, body = await lifecycle.readiness()
                if ok:
                    break
                await asyncio.sleep(0.02)
            assert ok, body
            assert sink.deliveries == Counter()  # the file is not this replica's to deliver
            r = await c.post("/api/feedback", json={"pay": 1}, headers=key)
            assert (r.status_code, r.json()["id"]) == (202, rid), r.text
            assert r.headers["idempotent-replayed"] == "true"
            r = await c.post("/api/feedback", json={"pay": 2}, headers=key)
            assert r.status_code == 422  # another body under the same key
            if held_fd is not None:
                os.close(held_fd)  # the recoverer died: the sweep takes the file over
            else:
                lock.rmdir()  # the operator moved the bad entry away
            for _ in range(300):
                if rid in sink.deliveries:
                    break
                await asyncio.sleep(0.02)
            r = await c.post("/api/feedback", json={"pay": 1}, headers=key)
            assert (r.status_code, r.json()["id"]) == (202, rid), r.text
    finally:
        await lifecycle.shutdown()
    assert sink.deliveries == Counter({rid: 1})


async def test_a_failing_sink_is_counted_in_the_drainer_state_and_retried_with_backoff(
    tmp_path: Path,
) -> None:
    """A sink that raises leaves its file (nothing lost) and is reported in `queue.drainer`
    (the ready body): the failure count and the error, without a secret; the drainer backs
    off between attempts and delivers once the sink works again, then reports 0 failures."""
    q = FeedbackQueue(tmp_path, drain_interval_ms=10)
    calls: list[float] = []

    async def down(records: Any) -> None:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) <= 4:
            raise ConnectionError("connection to postgresql://u:secret@db/x refused")
        await ok(records)

    ok = ListSink()
    rid = await q.append({"x": 1})
    q.start_drainer(down)
    for _ in range(500):
        if q.drainer.get("failures", 0) >= 2:
            break
        await asyncio.sleep(0.01)
    assert q.drainer["failures"] >= 2
    assert q.drainer["last_error"].startswith("ConnectionError: connection to postgresql://db")
    assert "secret" not in q.drainer["last_error"]
    for _ in range(500):
        if rid in ok.deliveries:
            break
        await asyncio.sleep(0.01)
    assert ok.deliveries == Counter({rid: 1})
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[2] > gaps[0] * 1.5  # backoff: the waits grow
    await asyncio.sleep(0.05)
    assert q.drainer == {"failures": 0}
    await q.close()
