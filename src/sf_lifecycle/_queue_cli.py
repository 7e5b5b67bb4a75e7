"""`sf-lifecycle queue status|recover --state-dir DIR`: look at and repair a queue offline.

`status` (`inspect_state_dir`, the offline census) counts records by reading every segment
(queued and draining for live owners, orphaned for dead ones, blocked behind a `.lock` that is
not a regular file), the quarantined files and the records already in the default SQLite sink.

`recover` re-drains the orphans of dead owners exactly as a starting server would, with a
progress line on stderr, and records each delivered `Idempotency-Key` in the idempotency index
(so a client retrying after the recovery gets its original id). By default it delivers into
`<state_dir>/feedback.sqlite3`; with `--app module:attr` it imports the app (with
`SF_STATE_DIR` set to `--state-dir` unless already set, for the command only) and uses the
queue the app installed on that directory: the app's own sink and delivery listeners. An app
that cannot be imported is one line and exit 6, as under `serve`. It is safe while servers run
on the same directory (live owners' files are never touched).

Both refuse a state directory they cannot safely use with one line on stderr (with `--json`,
a JSON object with an `"error"` field on stdout) and exit code 2: no `feedback` folder, a
link or a file where a folder belongs (`feedback`, `feedback/quarantine`), a link in place of
`feedback.sqlite3` (or its `-wal`, `-shm`, `-journal`), or a `feedback.sqlite3` that is not a
readable database. `status` only reads: it creates no file and probes locks read-only, so it
works on a read-only volume.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._queue import FeedbackQueue

__all__ = ["COMMAND", "add_arguments", "inspect_state_dir", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `status` and `recover` sub-commands to `parser` (the `queue` command)."""
    sub = parser.add_subparsers(dest="queue_command", required=True)
    status = sub.add_parser("status", help="count queued, draining, orphaned, quarantined records")
    status.add_argument("--state-dir", required=True, type=Path, help="the SF_STATE_DIR to inspect")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    recover = sub.add_parser(
        "recover",
        help="deliver orphaned segments to the sink and index their idempotency keys",
        description="Deliver the segment files of dead processes, exactly as a starting server "
        "does, and record their Idempotency-Keys in feedback/idempotency.sqlite3. The sink is "
        "<state_dir>/feedback.sqlite3 unless --app names the application whose own sink to use.",
    )
    recover.add_argument("--state-dir", required=True, type=Path, help="the SF_STATE_DIR")
    recover.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="the app served with `sf-lifecycle serve` (importable from the current directory): "
        "deliver into the sink its FeedbackQueue was installed with, through its listeners "
        "(the idempotency index of the queue)",
    )


class _Refused(Exception):
    """The state directory cannot be used as it is; the message says what to fix."""


def _check_state_dir(state_dir: Path, *, sink: bool) -> None:
    """The checks a server makes, without creating anything; `_Refused` naming the problem."""
    from ._errors import UnsafePath
    from ._sink import count_records
    from ._statefiles import open_state_dir, refuse_link

    try:
        os.close(open_state_dir(state_dir, "feedback", None))
        with contextlib.suppress(FileNotFoundError):
            os.close(open_state_dir(state_dir, "feedback/quarantine", None))
        if sink:
            db = state_dir / "feedback.sqlite3"
            for suffix in ("", "-wal", "-shm", "-journal"):
                refuse_link(db.with_name(db.name + suffix))
            if os.path.lexists(db):
                try:
                    count_records(db)
                except sqlite3.DatabaseError as exc:
                    raise _Refused(
                        f"{db} is not a readable SQLite database ({exc}); move it aside"
                    ) from None
    except FileNotFoundError:
        raise _Refused(f"no feedback queue under {state_dir}") from None
    except NotADirectoryError:
        raise _Refused(f"{state_dir} is not a folder") from None
    except UnsafePath as exc:
        raise _Refused(f"{state_dir}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise _Refused(f"{state_dir}: {exc}") from None


def _refuse(message: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": message}))
    print(f"sf-lifecycle: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run `queue status` or `queue recover`; returns the exit code (2: refused state dir)."""
    state_dir: Path = args.state_dir
    as_json = args.queue_command == "status" and args.json
    try:
        _check_state_dir(state_dir, sink=args.queue_command == "status" or not args.app)
    except _Refused as exc:
        return _refuse(str(exc), as_json)
    if args.queue_command == "status":
        try:
            return _status(state_dir, args.json)
        except (OSError, sqlite3.DatabaseError) as exc:  # changed since the check
            return _refuse(f"{state_dir}: {exc}", as_json)
    if args.app:
        return _recover_app(state_dir, args.app)
    return asyncio.run(_recover(state_dir))


def inspect_state_dir(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Offline census of a state directory for `sf-lifecycle queue status`.

    Counts records by reading every segment; a token whose lock is free is reported orphaned
    (probed read-only, without waiting). Nothing is created or written, and no link under the
    state directory is followed.

    Raises:
        UnsafePath: `feedback`, `feedback/quarantine` or `feedback.sqlite3` (or its `-wal`,
            `-shm`, `-journal`) is a link or of the wrong type.
        sqlite3.DatabaseError: `feedback.sqlite3` is not a readable database.
    """
    from ._segments import (
        NotASegment,
        SegmentReader,
        list_segments,
        probe_lock,
        quarantine_census,
    )
    from ._statefiles import refuse_link

    state = Path(state_dir)
    directory = state / "feedback"
    out: dict[str, Any] = {
        "queued": 0,
        "draining": 0,
        "orphaned": 0,
        "quarantined": 0,
        "rejected": 0,
        "delivered": None,
        "blocked": 0,
        "files": {"live": 0, "orphaned": 0, "quarantined": 0, "blocked": 0},
        "damaged": 0,
    }
    for token, files in list_segments(directory).items():
        if not files:
            continue
        owner = probe_lock(directory / f"{token}.lock")
        for _, kind, path in files:
            n = 0
            try:
                with SegmentReader(path) as reader:  # counted batch by batch: bounded memory
                    while batch := reader.batch(10_000):
                        n += len(batch)
                    out["damaged"] += len(reader.problems)
            except (OSError, NotASegment):
                continue
            if owner == "blocked":
                out["blocked"] += n
                out["files"]["blocked"] += 1
            elif owner == "dead":
                out["orphaned"] += n
                out["files"]["orphaned"] += 1
            else:
                out["queued" if kind == "log" else "draining"] += n
                out["files"]["live"] += 1
    set_aside, out["rejected"] = quarantine_census(state)
    out["quarantined"] = out["files"]["quarantined"] = set_aside
    db = state / "feedback.sqlite3"
    for name in (db.name, *(db.name + x for x in ("-wal", "-shm", "-journal"))):
        refuse_link(db.with_name(name))  # never opened through a link (the server refuses too)
    if os.path.lexists(db):
        from ._sink import count_records

        out["delivered"] = count_records(db)
    return out


def _status(state_dir: Path, as_json: bool) -> int:
    info = inspect_state_dir(state_dir)
    if as_json:
        print(json.dumps(info, sort_keys=True))
        return 0
    files = info["files"]
    delivered = "-" if info["delivered"] is None else info["delivered"]
    print(f"queued       {info['queued']:>8} records")
    print(f"draining     {info['draining']:>8} records")
    print(f"orphaned     {info['orphaned']:>8} records in {files['orphaned']} file(s)")
    if info["blocked"] or files["blocked"]:
        print(
            f"blocked      {info['blocked']:>8} records in {files['blocked']} file(s): their "
            ".lock is not a regular file; move it aside to let recovery deliver them"
        )
    print(f"quarantined  {info['quarantined']:>8} file(s)")
    if info["rejected"]:
        print(
            f"rejected     {info['rejected']:>8} records the sink can never store "
            "(feedback/quarantine/*.rejected)"
        )
    print(f"delivered    {delivered:>8} records (feedback.sqlite3)")
    if info["damaged"]:
        print(f"damaged      {info['damaged']:>8} region(s): recovery will quarantine them")
    return 0


def _recover_app(state_dir: Path, spec: str) -> int:
    """Import the app and recover through the queue it installed on `state_dir`.

    An app that cannot be imported is one line and exit 6, as under `serve` (exit 1 would
    say orphans were left). `SF_STATE_DIR` is set only while the app is imported and served.
    """
    saved = os.environ.get("SF_STATE_DIR")
    os.environ.setdefault("SF_STATE_DIR", str(state_dir))
    try:
        return _recover_imported(state_dir, spec)
    finally:  # `main()` in a process that lives on (a test) leaves its environment as it was
        if saved is None:
            os.environ.pop("SF_STATE_DIR", None)


def _recover_imported(state_dir: Path, spec: str) -> int:
    from ._apploader import AppNotLoaded, import_app
    from ._queue_hooks import installed_queues
    from ._runner import ExitCode

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        import_app(spec)
    except AppNotLoaded as exc:
        print(f"sf-lifecycle: {exc}", file=sys.stderr)
        return ExitCode.APP_NOT_LOADED
    queues = installed_queues(state_dir)
    if not queues:
        print(
            f"sf-lifecycle: --app {spec} installs no FeedbackQueue on {state_dir} "
            f"(its SF_STATE_DIR is {os.environ['SF_STATE_DIR']})",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_recover_with(queues[0]))


async def _recover(state_dir: Path) -> int:
    from ._queue import FeedbackQueue
    from ._sink import SqliteSink
    from .idempotency import IdempotencyIndex

    queue = FeedbackQueue(state_dir)
    sink = SqliteSink(state_dir / "feedback.sqlite3")
    queue.sink = sink
    queue.on_close(sink.close)
    # What the server's queue wiring does: a retried key finds its original id afterwards.
    queue.idempotency = IdempotencyIndex.for_queue(queue)
    return await _recover_with(queue)


async def _recover_with(queue: FeedbackQueue) -> int:
    sink = queue.sink
    assert sink is not None
    began = time.monotonic()
    task = asyncio.create_task(queue.recover(sink))
    interactive = sys.stderr.isatty()
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.2)
            _progress(queue.recovery, interactive)
        try:
            result = task.result()
        except Exception as exc:  # a clear line, not a traceback; nothing was deleted
            print(f"sf-lifecycle: recovery failed: {exc}", file=sys.stderr)
            return 1
    finally:
        if not task.done():
            task.cancel()
        await queue.close()  # also closes what was opened for it (sink, index)
    _progress(queue.recovery, interactive, final=True)
    took = time.monotonic() - began
    print(
        f"recovered {result.delivered} record(s) from {result.files_done} file(s) in {took:.2f} s"
        f"; {result.quarantined} quarantined; {result.files_left} left",
        file=sys.stderr,
    )
    return 0 if result.complete else 1


def _progress(state: dict[str, Any], interactive: bool, *, final: bool = False) -> None:
    total = state.get("files_total") or state.get("files_done") or 0
    done = state.get("files_done", 0)
    width = 30
    filled = width if not total else int(width * done / total)
    line = (
        f"recovering [{'#' * filled}{'.' * (width - filled)}] {done}/{total} file(s), "
        f"{state.get('records_delivered', 0)} record(s)"
    )
    if interactive:
        print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
    elif final or state.get("state") == "running":
        print(line, file=sys.stderr, flush=True)


COMMAND = (add_arguments, run)
