"""Background tasks that must never die: start-up recovery, the drainer, the orphan sweep.

A sink may raise any `BaseException`: a `CancelledError` nobody sent to the task, `SystemExit`,
`KeyboardInterrupt`. Each is a failure of that one sink call: logged, retried, reported in the
ready body, and the task lives on. Only a cancellation of the task itself stops it.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from sf_lifecycle._background import stops_task
from sf_lifecycle._config import Settings
from sf_lifecycle._lifecycle import Lifecycle
from sf_lifecycle._queue import FeedbackQueue

KINDS = ["cancelled", "systemexit", "keyboard"]


async def _misbehave(kind: str) -> None:
    if kind == "cancelled":  # awaits a future another task cancelled
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.cancel()
        await fut
    if kind == "systemexit":
        raise SystemExit(0)
    if kind == "keyboard":
        raise KeyboardInterrupt


class FailsOnce:
    """A real in-memory sink whose first `fails` calls raise `kind`."""

    def __init__(self, kind: str, fails: int = 1) -> None:
        self.kind = kind
        self.fails = fails
        self.calls = 0
        self.deliveries: Counter[str] = Counter()

    async def __call__(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.calls += 1
        if self.calls <= self.fails:
            await _misbehave(self.kind)
        for r in records:
            self.deliveries[r["id"]] += 1


def die(q: FeedbackQueue) -> None:
    """What SIGKILL leaves: files as they are, the flock released by the kernel."""
    q._simulate_crash()


def segments(q: FeedbackQueue) -> list[str]:
    return sorted(n for n in os.listdir(q.dir) if n.endswith((".log", ".draining")))


async def _until(cond: Any) -> None:
    async with asyncio.timeout(10):
        while not cond():  # noqa: ASYNC110 - polls state that other tasks change
            await asyncio.sleep(0.01)


async def test_stops_task_only_for_a_cancellation_of_this_task() -> None:
    seen: list[bool] = []

    async def judge(kind: str) -> None:
        try:
            await _misbehave(kind)
        except BaseException as exc:
            seen.append(stops_task(exc))

    for kind in KINDS:
        await asyncio.create_task(judge(kind))
    assert seen == [False, False, False]

    async def sleeper() -> None:
        try:
            await asyncio.sleep(10)
        except BaseException as exc:
            seen.append(stops_task(exc))
            raise

    task = asyncio.create_task(sleeper())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen[-1] is True
    assert stops_task(GeneratorExit())


@pytest.mark.parametrize("kind", KINDS)
async def test_startup_recovery_survives_a_sink_raising_base_exceptions(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: an orphan on disk; a sink whose first call raises `kind`; start-up: readiness
    is 503 naming the failed recovery, then 200 once the retry delivered the orphan; keyed
    writes are accepted again; the shutdown is clean and leaves nothing on disk. Before the fix
    `cancelled` ended the task silently (ready 200, the orphan never recovered, keyed writes
    503 for ever) and `systemexit`/`keyboard` escaped the event loop."""
    dead = FeedbackQueue(tmp_path)
    rid = await dead.append({"n": 1})
    die(dead)
    sink = FailsOnce(kind)
    lifecycle = Lifecycle(Settings(state_dir=tmp_path, drain_interval_ms=20))
    q = FeedbackQueue(tmp_path, settings=lifecycle.settings)
    q.install(lifecycle, sink)
    await lifecycle.startup()
    try:
        await _until(lambda: sink.calls >= 1)
        ok, body = await lifecycle.readiness()
        if not ok:  # the retry may already have run; while it has not, ready names it
            assert "feedback-recovery failed 1 time(s), retrying" in body["reason"], body
        await _until(lambda: rid in sink.deliveries)
        await _until(lambda: not q.recovering)
        ok, body = await lifecycle.readiness()
        assert ok, body
        assert body["checks"]["feedback-queue"]["recovery"]["state"] == "done", body
    finally:
        await lifecycle.shutdown()
    assert sink.deliveries == Counter({rid: 1})
    assert lifecycle.failed == []
    assert lifecycle.unfinished == []
    assert segments(q) == []
    assert "start-up task feedback-recovery failed (attempt 1)" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
async def test_background_drainer_survives_a_sink_raising_base_exceptions(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: the drainer's first sink call raises `kind`; the ready body reports the failure;
    the next period delivers; `close()` then drains and releases normally. Before the fix the
    drainer died, and `close()` re-raised its `CancelledError` without draining or releasing."""
    q = FeedbackQueue(tmp_path, drain_interval_ms=20)
    sink = FailsOnce(kind, fails=2)
    first = await q.append({"n": 1})
    q.start_drainer(sink)
    await _until(lambda: q.drainer["failures"] >= 1)
    assert q.drainer["last_error"], q.drainer
    await _until(lambda: first in sink.deliveries)
    assert q.drainer == {"failures": 0}
    second = await q.append({"n": 2})
    await _until(lambda: second in sink.deliveries)
    assert q._drainer is not None
    assert not q._drainer.done()
    third = await q.append({"n": 3})
    result = await q.close()
    assert result is not None
    assert result.complete
    assert sink.deliveries == Counter({first: 1, second: 1, third: 1})
    assert segments(q) == []
    assert q._released
    assert "background drain failed" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
async def test_orphan_sweep_survives_a_sink_raising_base_exceptions(
    kind: str, tmp_path: Path
) -> None:
    """Steps: the sweep runs every 100 ms; a peer dies leaving a record; the first sweep's
    sink call raises `kind`; the sweep reports it, lives on, and the next one delivers."""
    q = FeedbackQueue(tmp_path, orphan_sweep_ms=100)
    sink = FailsOnce(kind)
    q.start_sweeper(sink)
    peer = FeedbackQueue(tmp_path)
    rid = await peer.append({"n": 1})
    die(peer)
    await _until(lambda: sink.calls >= 1)
    await _until(lambda: rid in sink.deliveries)
    assert q._sweeper is not None
    assert not q._sweeper.done()
    await _until(lambda: q.sweep.get("state") == "done")
    await q.close()
    assert sink.deliveries == Counter({rid: 1})
    assert segments(q) == []
