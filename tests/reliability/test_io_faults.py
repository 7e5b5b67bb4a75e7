"""Fail the N-th `write`, `fsync`, `rename`, `open`, `unlink` of a whole cycle, every N.

Extends `tests/unit/test_queue.py` (one fault at the first call) to every call of an append +
drain + append + drain + crash + recover cycle, with ENOSPC, EIO, EFBIG and short writes. For
each fault: no append is acknowledged unless durable, a segment whose fsync failed is never
written or fsynced again, the queue keeps working, and every acknowledged record reaches the sink
exactly once. Then the HTTP layer: 503 with the errno while the disk fails, 202 again after.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import tempfile
import types
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sf_lifecycle import _fs
from sf_lifecycle._config import Settings
from sf_lifecycle._errors import DiskWriteError
from sf_lifecycle._queue import FeedbackQueue
from tests.unit.test_queue import ListSink, die

from ._harness import example_create_app, sink_rows

OPS = ("write", "fsync", "rename", "open", "unlink")
ERRORS: dict[str, list[tuple[int, bool]]] = {
    "write": [
        (errno.ENOSPC, False),
        (errno.EIO, False),
        (errno.EFBIG, False),
        (errno.ENOSPC, True),
    ],
    "fsync": [(errno.EIO, False), (errno.ENOSPC, False)],
    "rename": [(errno.EIO, False), (errno.ENOSPC, False)],
    "open": [(errno.ENOSPC, False), (errno.EIO, False)],
    "unlink": [(errno.EIO, False)],
}


class Disk:
    """The `os` module as the queue sees it: counts calls, fails the `fail_at`-th `op` once.

    A short write writes half of the data, reports it, and the next write of the group fails.
    Every fd whose fsync failed is remembered by path; a later write or fsync to that path is a
    defect (a failed fsync must never be retried and then acknowledged).
    """

    def __init__(self, op: str | None, fail_at: int, err: int, short: bool) -> None:
        self.op, self.fail_at, self.err, self.short = op, fail_at, err, short
        self.calls: Counter[str] = Counter()
        self.poisoned: set[str] = set()
        self.violations: list[str] = []
        self.fired = False
        self._fail_next_write = False

    def _path(self, fd: int) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return f"fd{fd}"

    def _due(self, name: str) -> bool:
        self.calls[name] += 1
        if name == self.op and self.calls[name] == self.fail_at and not self.fired:
            self.fired = True
            return True
        return False

    def namespace(self) -> Any:
        def write(fd: int, data: Any) -> int:
            path = self._path(fd)
            if path in self.poisoned:
                self.violations.append(f"write to {path} after its fsync failed")
            if self._fail_next_write:
                self._fail_next_write = False
                raise OSError(self.err, os.strerror(self.err))
            if self._due("write"):
                if self.short:
                    self._fail_next_write = True
                    return os.write(fd, bytes(data[: max(1, len(data) // 2)]))
                raise OSError(self.err, os.strerror(self.err))
            return os.write(fd, data)

        def fsync(fd: int) -> None:
            path = self._path(fd)
            if path in self.poisoned and not os.path.isdir(path):
                self.violations.append(f"fsync of {path} after its fsync failed")
            if self._due("fsync"):
                self.poisoned.add(path)
                raise OSError(self.err, os.strerror(self.err))
            os.fsync(fd)

        def wrap(name: str) -> Any:
            real = getattr(os, name)

            def call(*args: Any, **kw: Any) -> Any:
                if self._due(name):
                    raise OSError(self.err, os.strerror(self.err))
                return real(*args, **kw)

            return call

        return types.SimpleNamespace(
            **{
                **vars(os),
                "write": write,
                "fsync": fsync,
                "rename": wrap("rename"),
                "open": wrap("open"),
                "unlink": wrap("unlink"),
            }
        )


async def cycle(state: Path, disk: Disk) -> tuple[list[str], list[str], ListSink]:
    """append 3, drain, append 2, crash, recover + append 2 + drain: (acked, refused, sink)."""
    sink = ListSink()
    acked: list[str] = []
    refused: list[str] = []

    async def append(q: FeedbackQueue, tag: str) -> None:
        try:
            acked.append(await q.append({"tag": tag}))
        except DiskWriteError as exc:
            if exc.errno != disk.err:
                raise
            refused.append(tag)

    async def drain(q: FeedbackQueue) -> None:
        try:
            await q.drain(sink)
        except OSError as exc:  # a failed rename or unlink: the drain is retried later
            if exc.errno != disk.err:
                raise

    async def new_queue() -> FeedbackQueue | None:
        try:
            return FeedbackQueue(state, batch_records=2)
        except OSError as exc:  # its lock file could not be opened: this process never starts
            if exc.errno != disk.err:
                raise
            return None

    q = await new_queue()
    if q is None:  # nothing was attempted: as if every write had been refused
        return acked, [*refused, "a0", "a1", "a2", "b0", "b1", "c0", "c1"], sink
    for i in range(3):
        await append(q, f"a{i}")
    await drain(q)
    for i in range(2):
        await append(q, f"b{i}")
    die(q)
    q = await new_queue()
    if q is None:
        return acked, [*refused, "c0", "c1"], sink
    try:
        await q.recover(sink)
    except OSError as exc:
        if exc.errno != disk.err:
            raise
    for i in range(2):
        await append(q, f"c{i}")
    await drain(q)
    die(q)
    return acked, refused, sink


def run_cycle(op: str | None, n: int, err: int, short: bool) -> tuple[Disk, int]:
    """One cycle under the fault, then a fault-free recovery; checks the oracle."""
    disk = Disk(op, n, err, short)
    with tempfile.TemporaryDirectory() as d:
        state = Path(d)

        async def go() -> int:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(_fs, "os", disk.namespace())
                acked, refused, sink = await cycle(state, disk)
            final = FeedbackQueue(state)
            result = await final.recover(sink)
            assert result.complete
            await final.drain(sink)
            await final.close()
            assert set(sink.deliveries) == set(acked), (op, n, err)
            assert all(c >= 1 for c in sink.deliveries.values())
            delivered_tags = {r["data"]["tag"] for r in sink.stored.values()}
            assert not delivered_tags & set(refused), "a refused append was delivered"
            assert len(acked) + len(refused) == 7
            left = [x for x in os.listdir(state / "feedback") if x.endswith((".log", ".draining"))]
            assert left == []
            assert os.listdir(state / "feedback" / "quarantine") == []
            return len(refused)

        refused = asyncio.run(go())
    assert disk.violations == [], disk.violations
    return disk, refused


def test_fault_at_every_call_of_a_cycle_keeps_every_acknowledged_record() -> None:
    baseline, _ = run_cycle(None, 0, 0, False)
    cases = 0
    for op in OPS:
        total = baseline.calls[op]
        assert total > 0, f"the cycle never calls {op}"
        for err, short in ERRORS[op]:
            for n in range(1, total + 1):
                disk, _ = run_cycle(op, n, err, short)
                assert disk.fired, (op, n)
                cases += 1
    assert cases >= 60


@pytest.fixture
async def example(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = example_create_app()(Settings(state_dir=tmp_path, drain_interval_ms=20, drain_delay_ms=0))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


async def test_http_answers_503_while_the_disk_fails_and_202_after(
    example: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example app: 202, then every write fails (ENOSPC) -> 503 naming ENOSPC, then 202."""
    headers = {"content-type": "application/json"}
    ok = await example.post("/api/feedback", content=b'{"n": 0}', headers=headers)
    assert ok.status_code == 202
    full = types.SimpleNamespace(**vars(os))

    def no_space(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    full.write = no_space
    monkeypatch.setattr(_fs, "os", full)
    try:
        for _ in range(5):
            r = await example.post("/api/feedback", content=b'{"n": 1}', headers=headers)
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["code"] == "disk_write_failed"
            assert r.json()["errno"] == "ENOSPC"
        health = await example.get("/api/healthz")
        assert health.status_code == 200  # the server keeps serving
    finally:
        monkeypatch.undo()
    again = await example.post("/api/feedback", content=b'{"n": 2}', headers=headers)
    assert again.status_code == 202
    ids = {ok.json()["id"], again.json()["id"]}
    for _ in range(200):
        if set(_sink_ids(tmp_path)) >= ids:
            break
        await asyncio.sleep(0.02)
    assert set(_sink_ids(tmp_path)) == ids  # nothing refused was stored


def _sink_ids(state: Path) -> list[str]:
    return [rid for rid, body in sink_rows(state) if json.loads(body) is not None]
