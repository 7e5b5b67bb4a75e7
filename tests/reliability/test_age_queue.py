"""Age: the queue started from a state directory that looks old (issue 11, defect 1's class).

A long-lived replica numbers one segment per drain cycle with writes: at the default 200 ms that
passes 999,999 after ~55 h and 9,999,999 after ~23 days. These tests build a state directory with
segment numbers on both sides of every width boundary (old six-digit names beside seven- and
eight-digit ones), a token at the end of its 48-bit clock, and servers whose own numbering crosses
a boundary while they take writes, then check with the oracle that every acknowledged record is
in the sink exactly once and nothing is left on disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sf_lifecycle._queue import FeedbackQueue
from sf_lifecycle._queue_cli import inspect_state_dir
from sf_lifecycle.testing import ServerProcess

from ._harness import BASE_ENV, ROOT, Oracle, post_one

pytestmark = pytest.mark.integration
APP = "tests.integration.queue_app:app"
#: (first segment number - 1, segments) of the dead owners in the "old" state directory.
OLD_OWNERS = [(0, 2), (999_997, 4), (9_999_997, 4), (99_999_998, 3)]


def _die(q: FeedbackQueue) -> None:
    """What SIGKILL leaves: the files as they are, the flock dropped."""
    q._simulate_crash()


async def _build_old_state(state: Path, oracle: Oracle) -> list[str]:
    """Dead owners whose segments straddle each width boundary; returns the file names."""
    for start, segments in OLD_OWNERS:
        q = FeedbackQueue(state)
        q._start_segments_after(start)
        for s in range(segments):
            for _ in range(3):
                nonce = oracle.nonce("old")
                oracle.ack(nonce, await q.append({"nonce": nonce, "pad": "x" * 64}))
            if s < segments - 1:
                await q._seal_segment()  # .draining, the next append opens a new .log
        _die(q)
    # A token at the end of its 48-bit millisecond clock (the year 10889).
    q = FeedbackQueue(state)
    nonce = oracle.nonce("old")
    oracle.ack(nonce, await q.append({"nonce": nonce}))
    _die(q)
    late = "f" * 12 + "0123456789"
    for name in os.listdir(q.dir):
        if name.startswith(q.token):
            os.rename(q.dir / name, q.dir / name.replace(q.token, late))
    return sorted(n for n in os.listdir(state / "feedback") if n.endswith((".log", ".draining")))


def _server(state: Path, env: dict[str, str]) -> ServerProcess:
    full = {**BASE_ENV, "QUEUE_APP_SINK_DB": "feedback.sqlite3", "SF_ORPHAN_SWEEP_MS": "300"}
    return ServerProcess(APP, state_dir=state, env={**full, **env}, cwd=ROOT)


def test_a_state_dir_that_looks_old_is_recovered_and_counted(tmp_path: Path) -> None:
    """1. Build the old-looking directory: `queue status` counts every record as orphaned.
    2. A server whose numbering starts at 999,998 recovers it, takes 30 writes across the
       boundary (drains every 30 ms) and is SIGKILLed.
    3. A server starting at 9,999,998 recovers that, takes 30 more writes, stops cleanly.
    4. Oracle: every acked record in the sink once, no segment left, status counts 0.
    """
    state = tmp_path / "state"
    oracle = Oracle()
    names = asyncio.run(_build_old_state(state, oracle))
    seqs = {n.split(".")[1] for n in names}
    assert {"999999", "1000000", "9999999", "10000000", "99999999", "100000000"} <= seqs, seqs
    status = inspect_state_dir(state)
    assert (status["orphaned"], status["files"]["orphaned"]) == (len(oracle.acked), len(names))

    first = _server(state, {"QUEUE_APP_START_SEQ": "999997"})
    try:
        first.start().wait_ready(30)
        for _ in range(30):
            assert post_one(first, oracle) == 202
        first.kill()
    finally:
        first.close()
    second = _server(state, {"QUEUE_APP_START_SEQ": "9999997"})
    try:
        second.start().wait_ready(30)
        for _ in range(30):
            assert post_one(second, oracle) == 202
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.logs()
    finally:
        second.close()

    verdict = oracle.check(state)
    assert verdict.ok, verdict
    assert verdict.in_sink == len(oracle.acked) == 30 + 30 + 3 * 13 + 1
    status_cmd = ["queue", "status", "--state-dir", str(state), "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "sf_lifecycle", *status_cmd],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    counted = json.loads(out.stdout)
    assert (counted["orphaned"], counted["queued"], counted["draining"]) == (0, 0, 0)
    assert counted["delivered"] == len(oracle.acked)
