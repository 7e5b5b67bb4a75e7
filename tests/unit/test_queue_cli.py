"""`sf-lifecycle queue status|recover`: refusals are one line and exit 2; status only reads."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from sf_lifecycle import _queue_cli as queue_cli
from sf_lifecycle._queue import FeedbackQueue

from .test_queue import die


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    queue_cli.add_arguments(parser)
    return queue_cli.run(parser.parse_args(argv))


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _other_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE feedback (id)")
    conn.execute("INSERT INTO feedback VALUES (1)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("case", ["feedback link", "damaged sink", "sink link", "no queue"])
@pytest.mark.parametrize("command", ["status", "status --json", "recover"])
def test_a_refused_state_dir_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, command: str
) -> None:
    """Nothing is followed or created outside: a linked `feedback.sqlite3` gets no `-wal` or
    `-shm` beside its target."""
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    state.mkdir()
    elsewhere.mkdir()
    if case == "feedback link":
        (state / "feedback").symlink_to(elsewhere)
    else:
        (state / "feedback").mkdir()
    if case == "damaged sink":
        (state / "feedback.sqlite3").write_bytes(b"junk\n" * 100)
    elif case == "sink link":
        _other_db(elsewhere / "x.sqlite3")
        (state / "feedback.sqlite3").symlink_to(elsewhere / "x.sqlite3")
    elif case == "no queue":
        (state / "feedback").rmdir()
    before = listing(elsewhere)
    assert run(*command.split(), "--state-dir", str(state)) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith("sf-lifecycle: ")
    expect = {
        "feedback link": "'feedback' in the state directory is a symbolic link",
        "damaged sink": "feedback.sqlite3 is not a readable SQLite database",
        "sink link": "feedback.sqlite3 is a symbolic link",
        "no queue": "no feedback queue under",
    }[case]
    assert expect in line
    if command == "status --json":
        assert expect in json.loads(out)["error"]
    else:
        assert out == ""
    assert listing(elsewhere) == before


async def test_status_only_reads_and_works_with_read_only_locks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lock file that cannot be opened for writing (as on a read-only volume; here made
    immutable) is still probed: live and dead owners are told apart, nothing is "blocked",
    and status creates nothing (not even a missing lock file)."""
    dead = FeedbackQueue(tmp_path)
    for i in range(3):
        await dead.append({"i": i})
    die(dead)
    gone = FeedbackQueue(tmp_path)
    await gone.append({"g": 1})
    die(gone)
    (gone.dir / f"{gone.token}.lock").unlink()  # an owner whose lock file was removed
    live = FeedbackQueue(tmp_path)
    await live.append({"live": 1})
    locks = [str(q.dir / f"{q.token}.lock") for q in (dead, live)]
    before = listing(tmp_path)
    await asyncio.to_thread(subprocess.run, ["chattr", "+i", *locks], check=True)
    try:
        code = await asyncio.to_thread(run, "status", "--state-dir", str(tmp_path), "--json")
    finally:
        await asyncio.to_thread(subprocess.run, ["chattr", "-i", *locks], check=True)
    assert code == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["orphaned"], status["queued"], status["blocked"]) == (4, 1, 0), status
    assert listing(tmp_path) == before
    await live.close()


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("_cli_raising:app", "importing _cli_raising raised RuntimeError('no database URL')"),
        ("_cli_apps:nope", "module _cli_apps has no attribute 'nope'"),
        ("_cli_apps:not_callable", "is a int, not an ASGI app (not callable)"),
        ("nosuch_module:app", "no module named 'nosuch_module'"),
    ],
)
def test_recover_with_an_app_that_cannot_be_loaded_is_one_line_and_exit_6(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    spec: str,
    words: str,
) -> None:
    """As `serve`: one line naming the problem, exit 6 (not 1, which says orphans are left),
    and the environment of a process that lives on is as it was (no SF_STATE_DIR left)."""
    from sf_lifecycle._cli import main

    (tmp_path / "feedback").mkdir()
    monkeypatch.chdir(Path(__file__).parent)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.delenv("SF_STATE_DIR", raising=False)
    assert main(["queue", "recover", "--state-dir", str(tmp_path), "--app", spec]) == 6
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"sf-lifecycle: app {spec!r}: ")
    assert words in line
    assert "SF_STATE_DIR" not in os.environ


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_status_skips_a_reason_file_that_is_not_a_regular_file(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO under a `.reason` name once blocked `queue status` forever (opened without
    O_NONBLOCK); a directory failed it naming a descriptor number. Both are skipped, named."""
    quarantine = tmp_path / "feedback" / "quarantine"
    quarantine.mkdir(parents=True)
    good = quarantine / "aaaaaaaaaaaaaaaaaaaaaa.000001.0123456789abcdef.rejected"
    good.write_bytes(b"")
    (quarantine / f"{good.name}.reason").write_text("id-1 DataError 22P05\nid-2 DataError 22P05\n")
    odd = quarantine / "bbbbbbbbbbbbbbbbbbbbbb.000002.fedcba9876543210.rejected"
    odd.write_bytes(b"")
    reason = quarantine / f"{odd.name}.reason"
    if kind == "fifo":
        os.mkfifo(reason)
    else:
        reason.mkdir()
    assert run("status", "--state-dir", str(tmp_path), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rejected"] == 2
    assert f"{odd.name}.reason" in caplog.text
