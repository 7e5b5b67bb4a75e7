"""Simulated power loss, the ALICE way, on the queue's own file operations.

An append + drain cycle runs against the real disk while every file-system call the queue makes
is also applied to a model of what a power cut may keep: appended bytes are durable only after
an fsync of their file, directory entries (create, rename, unlink) only after an fsync of their
directory. After every call, the crash states are built: the durable directory plus each prefix of
the directory operations not yet synced, and every file with none, half or all of its unsynced
bytes (a torn append). Each state is written to a fresh directory and recovered; every record
acknowledged before that call must be delivered, and nothing that was never appended.
"""

from __future__ import annotations

import asyncio
import copy
import os
import tempfile
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sf_lifecycle import _fs
from sf_lifecycle._queue import FeedbackQueue
from tests.unit.test_queue import ListSink


@dataclass
class Model:
    """What survives a power cut: durable and pending bytes per inode, entries per directory."""

    data: dict[int, bytes] = field(default_factory=dict)  # durable bytes per inode
    pending: dict[int, bytes] = field(default_factory=dict)  # written, not yet fsynced
    durable_dir: dict[str, int] = field(default_factory=dict)
    live_dir: dict[str, int] = field(default_factory=dict)
    dir_ops: list[tuple[str, str, str | int]] = field(default_factory=list)

    def states(self) -> list[dict[str, bytes]]:
        """Every crash state: (prefix of unsynced directory ops) x (none / half / all of the
        unsynced bytes of every file)."""
        out = []
        for j in range(len(self.dir_ops) + 1):
            entries = dict(self.durable_dir)
            for op, a, b in self.dir_ops[:j]:
                if op == "create":
                    entries[a] = int(b)
                elif op == "rename":
                    entries[str(b)] = entries.pop(a)
                else:
                    entries.pop(a, None)
            for part in (0, 1, 2):
                files = {}
                for name, ino in entries.items():
                    tail = self.pending.get(ino, b"")
                    files[name] = self.data.get(ino, b"") + tail[: len(tail) * part // 2]
                out.append(files)
        return out


class Recorder:
    """The `os` module as the queue sees it: real calls, mirrored into `Model`, snapshotted."""

    def __init__(self, qdir: Path) -> None:
        self.qdir = str(qdir)
        self.model = Model()
        self.paths: dict[int, str] = {}  # fd -> path
        self.inode: dict[str, int] = {}  # live path -> model inode
        self.next_ino = 0
        self.lock = threading.Lock()
        self.acked: set[str] = set()
        self.sunk: set[str] = set()
        self.snapshots: list[tuple[Model, frozenset[str], frozenset[str]]] = []

    def _snap(self) -> None:
        self.snapshots.append(
            (copy.deepcopy(self.model), frozenset(self.acked), frozenset(self.sunk))
        )

    def _name(self, path: Any) -> str | None:
        p = os.fspath(path)
        d, name = os.path.split(p)
        return name if d == self.qdir else None

    def namespace(self) -> Any:
        m = self.model

        def open_(path: Any, flags: int, mode: int = 0o777) -> int:
            fd = os.open(path, flags, mode)
            with self.lock:
                self.paths[fd] = os.fspath(path)
                name = self._name(path)
                if name is not None and flags & os.O_CREAT:
                    self.next_ino += 1
                    m.live_dir[name] = self.next_ino
                    m.dir_ops.append(("create", name, self.next_ino))
                    self._snap()
            return fd

        def write(fd: int, data: Any) -> int:
            n = os.write(fd, data)
            with self.lock:
                name = self._name(self.paths[fd])
                if name is not None:
                    ino = m.live_dir[name]
                    m.pending[ino] = m.pending.get(ino, b"") + bytes(data[:n])
                    self._snap()
            return n

        def fsync(fd: int) -> None:
            os.fsync(fd)
            with self.lock:
                path = self.paths[fd]
                if path == self.qdir:
                    m.durable_dir = dict(m.live_dir)
                    m.dir_ops.clear()
                else:
                    name = self._name(path)
                    if name is not None:
                        ino = m.live_dir[name]
                        m.data[ino] = m.data.get(ino, b"") + m.pending.pop(ino, b"")
                self._snap()

        def rename(src: Any, dst: Any) -> None:
            os.rename(src, dst)
            with self.lock:
                a, b = self._name(src), self._name(dst)
                if a is not None and b is not None:
                    m.live_dir[b] = m.live_dir.pop(a)
                    m.dir_ops.append(("rename", a, b))
                    self._snap()

        def unlink(path: Any) -> None:
            os.unlink(path)
            with self.lock:
                name = self._name(path)
                if name is not None and name in m.live_dir:
                    del m.live_dir[name]
                    m.dir_ops.append(("unlink", name, ""))
                    self._snap()

        return types.SimpleNamespace(
            **{
                **vars(os),
                "open": open_,
                "write": write,
                "fsync": fsync,
                "rename": rename,
                "unlink": unlink,
            }
        )


class RecordingSink(ListSink):
    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    async def __call__(self, records: Any) -> None:
        await super().__call__(records)
        with self.rec.lock:
            self.rec.sunk.update(r["id"] for r in records)


async def recorded_cycle(state: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Recorder, set[str]]:
    q = FeedbackQueue(state, batch_records=2)
    rec = Recorder(q.dir)
    monkeypatch.setattr(_fs, "os", rec.namespace())
    sink = RecordingSink(rec)
    appended: set[str] = set()
    for n in (3, 2, 2):
        for i in range(n):
            rid = await q.append({"i": i, "pad": "p" * 40})
            appended.add(rid)
            with rec.lock:
                rec.acked.add(rid)
        if n != 2 or len(appended) < 7:
            await q.drain(sink)
    monkeypatch.undo()
    q._release()
    return rec, appended


async def test_every_power_loss_state_of_a_cycle_keeps_every_acknowledged_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec, appended = await recorded_cycle(tmp_path / "live", monkeypatch)
    assert len(rec.snapshots) > 20
    checked = 0
    for model, acked, sunk in rec.snapshots:
        for files in model.states():
            await asyncio.to_thread(_check_state, files, acked, sunk, appended)
            checked += 1
    assert checked > 100


def _check_state(
    files: dict[str, bytes], acked: frozenset[str], sunk: frozenset[str], appended: set[str]
) -> None:
    with tempfile.TemporaryDirectory() as d:
        qdir = Path(d) / "feedback"
        qdir.mkdir()
        for name, data in files.items():
            (qdir / name).write_bytes(data)

        async def recover() -> set[str]:
            sink = ListSink()
            q = FeedbackQueue(d)
            result = await q.recover(sink)
            assert result.complete
            assert result.quarantined == 0  # a power cut only tears tails; nothing is corrupt
            await q.close()
            return set(sink.deliveries)

        delivered = asyncio.run(recover()) | set(sunk)
        lost = acked - delivered
        assert not lost, f"acknowledged records lost in crash state {sorted(files)}"
        assert delivered <= appended
        left = [n for n in os.listdir(qdir) if n.endswith((".log", ".draining"))]
        assert left == []
