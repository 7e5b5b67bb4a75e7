"""`sf-lifecycle queue status|recover --state-dir DIR`: look at and repair a queue offline.

`status` counts records by reading every segment (queued and draining for live owners, orphaned
for dead ones), the quarantined files and the records already in the default SQLite sink.
`recover` re-drains the orphans of dead owners into `<state_dir>/feedback.sqlite3`, exactly as a
starting server would, with a progress line on stderr; it is safe while servers run on the same
directory (live owners' files are never touched).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["COMMAND", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `status` and `recover` sub-commands to `parser` (the `queue` command)."""
    sub = parser.add_subparsers(dest="queue_command", required=True)
    status = sub.add_parser("status", help="count queued, draining, orphaned, quarantined records")
    status.add_argument("--state-dir", required=True, type=Path, help="the SF_STATE_DIR to inspect")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    recover = sub.add_parser("recover", help="deliver orphaned segments to the SQLite sink")
    recover.add_argument("--state-dir", required=True, type=Path, help="the SF_STATE_DIR")


def run(args: argparse.Namespace) -> int:
    """Run `queue status` or `queue recover`; returns the exit code."""
    state_dir: Path = args.state_dir
    if not (state_dir / "feedback").is_dir():
        print(f"sf-lifecycle: no feedback queue under {state_dir}", file=sys.stderr)
        return 2
    if args.queue_command == "status":
        return _status(state_dir, args.json)
    return asyncio.run(_recover(state_dir))


def _status(state_dir: Path, as_json: bool) -> int:
    from .queue import inspect_state_dir

    info = inspect_state_dir(state_dir)
    if as_json:
        print(json.dumps(info, sort_keys=True))
        return 0
    files = info["files"]
    delivered = "-" if info["delivered"] is None else info["delivered"]
    print(f"queued       {info['queued']:>8} records")
    print(f"draining     {info['draining']:>8} records")
    print(f"orphaned     {info['orphaned']:>8} records in {files['orphaned']} file(s)")
    print(f"quarantined  {info['quarantined']:>8} file(s)")
    print(f"delivered    {delivered:>8} records (feedback.sqlite3)")
    if info["damaged"]:
        print(f"damaged      {info['damaged']:>8} region(s): recovery will quarantine them")
    return 0


async def _recover(state_dir: Path) -> int:
    from .queue import FeedbackQueue
    from .sink import SqliteSink

    queue = FeedbackQueue(state_dir)
    sink = SqliteSink(state_dir / "feedback.sqlite3")
    began = time.monotonic()
    task = asyncio.create_task(queue.recover(sink))
    interactive = sys.stderr.isatty()
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.2)
            _progress(queue.recovery, interactive)
        result = task.result()
    finally:
        if not task.done():
            task.cancel()
        queue.sink = sink
        await queue.close()
        sink.close()
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
