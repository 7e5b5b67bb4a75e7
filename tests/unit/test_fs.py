"""_fs: every file-system call of the queue goes through the one seam the fault tests replace."""

from __future__ import annotations

import ast
import errno
import importlib
import os
import types
from pathlib import Path
from typing import Any

import pytest

from sf_lifecycle import _fs
from sf_lifecycle._errors import DiskWriteError
from sf_lifecycle._queue import FeedbackQueue

QUEUE_MODULES = ("_segments", "_writer", "_delivery", "_recovery", "_queue_hooks", "_queue")


@pytest.mark.parametrize("name", QUEUE_MODULES)
def test_queue_modules_call_the_file_system_only_through_the_seam(name: str) -> None:
    """A call on the real `os` module (imported at the top) would escape the fault-injection
    and power-loss tests; the seam is `_fs.os`. Annotations (`os.PathLike`) are not calls. (A
    module that imports `os` writes `_fs.os.<call>`, never a local `os = _fs.os` alias.)"""
    module = importlib.import_module(f"sf_lifecycle.{name}")
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    imports_os = any(
        isinstance(node, ast.Import) and any(a.name == "os" for a in node.names)
        for node in tree.body
    )
    direct = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            root = node.func
            while isinstance(root, ast.Attribute):
                root = root.value
            if imports_os and isinstance(root, ast.Name) and root.id == "os":
                direct.append(f"line {node.lineno}: {ast.unparse(node.func)}")
    assert direct == [], f"{name} calls the real os directly: {direct}"


@pytest.mark.parametrize("name", QUEUE_MODULES)
def test_queue_modules_never_bind_a_local_os(name: str) -> None:
    """The seam is written out at each use (`_fs.os.fsync(fd)`): a local `os = _fs.os` or an
    `import os` inside a function would make `os.<call>` mean either module, and the check
    above could not tell them apart."""
    module = importlib.import_module(f"sf_lifecycle.{name}")
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    bound = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if (isinstance(node, ast.Name) and node.id == "os" and isinstance(node.ctx, ast.Store))
        or (
            isinstance(node, ast.Import | ast.ImportFrom)
            and id(node) not in top
            and any((a.asname or a.name) == "os" for a in node.names)
        )
    ]
    assert bound == [], f"{name} binds a local os: {bound}"


async def test_replacing_the_seam_fails_every_kind_of_queue_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps: replace `_fs.os` with one whose `fsync`, `rename` and `unlink` are counted;
    append, drain (rename to `.draining`, deliver, unlink): each kind is seen through the
    seam; then an `fsync` failure is refused with its errno and nothing is acknowledged."""
    q = FeedbackQueue(tmp_path)
    seen: dict[str, int] = {"fsync": 0, "rename": 0, "unlink": 0}
    fail = {"fsync": False}

    def counted(name: str) -> Any:
        real = getattr(os, name)

        def call(*args: Any, **kw: Any) -> Any:
            seen[name] += 1
            if fail.get(name):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(*args, **kw)

        return call

    monkeypatch.setattr(
        _fs, "os", types.SimpleNamespace(**{**vars(os), **{n: counted(n) for n in seen}})
    )

    async def sink(records: Any) -> None:
        return None

    try:
        await q.append({"x": 1})
        assert (await q.drain(sink)).delivered == 1
        assert seen["fsync"] >= 2  # the segment and its directory
        assert seen["rename"] == 1  # .log -> .draining
        assert seen["unlink"] == 1  # the delivered file
        fail["fsync"] = True
        with pytest.raises(DiskWriteError) as info:
            await q.append({"x": 2})
        assert info.value.errno == errno.EIO
    finally:
        monkeypatch.undo()
        q._release()
