"""SIGKILL at every named crash point of an append + drain + recover cycle.

Each case runs real server processes (`examples.sf_server:app`) on one state dir:

- append / drain / sink points: the server runs with `SF_CRASH_AT=point:N`, records are posted
  one by one until the process kills itself, or, for drain points, SIGTERM starts the final
  drain that reaches the point;
- recover points: a first server is SIGKILLed from outside holding acknowledged records; a
  second one starts with `SF_CRASH_AT` and dies while recovering them.

Then a clean restart on the same state dir recovers, and the oracle must hold.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from sf_lifecycle import _crashpoints

from ._harness import Oracle, clean_restart, post_one, start_server

pytestmark = pytest.mark.integration

#: (point, N): every point at its first pass, the repeatable ones at a later pass too.
CASES = [
    ("append.after_open", 1),
    ("append.after_open", 2),  # the segment opened after a drain
    ("append.before_write", 1),
    ("append.before_write", 3),
    ("append.after_write", 1),
    ("append.after_write", 4),
    ("append.after_fsync", 1),
    ("append.after_fsync", 5),
    ("drain.before_rename", 1),
    ("drain.after_rename", 1),
    ("sink.before_commit", 1),
    ("sink.before_commit", 2),
    ("drain.after_sink_commit", 1),
    ("drain.after_sink_commit", 2),
    ("drain.before_unlink", 1),
    ("drain.after_unlink", 1),
    ("recover.after_claim", 1),
    ("recover.before_lock_unlink", 1),
]
RECORDS = 6


def test_every_declared_crash_point_is_exercised() -> None:
    """A point added to `_crashpoints.POINTS` without a case here fails this test."""
    assert {p for p, _ in CASES} == set(_crashpoints.POINTS)


@pytest.mark.parametrize(("point", "n"), CASES, ids=[f"{p}:{n}" for p, n in CASES])
def test_sigkill_at_crash_point_then_restart_keeps_the_oracle(
    tmp_path: Path, point: str, n: int
) -> None:
    state = tmp_path / "state"
    oracle = Oracle()
    crash = {"SF_CRASH_AT": f"{point}:{n}", "SF_DRAIN_BATCH_RECORDS": "4"}
    if point.startswith("append.after_open") and n == 2:
        crash["SF_DRAIN_INTERVAL_MS"] = "20"  # a drain between appends: the 2nd segment
    elif not point.startswith("append."):
        crash["SF_DRAIN_INTERVAL_MS"] = "3600000"  # the final drain (SIGTERM) reaches the point
    if point.startswith("recover."):
        holder = start_server(state, {"SF_DRAIN_INTERVAL_MS": "3600000"})
        try:
            holder.wait_ready()
            assert all(post_one(holder, oracle) == 202 for _ in range(RECORDS))
        finally:
            holder.kill()  # acknowledged records left as an orphan segment
            holder.close()
    server = start_server(state, crash)
    try:
        if not point.startswith("recover."):
            server.wait_ready()
            for _ in range(RECORDS):
                if post_one(server, oracle) != 202:
                    break
                if point == "append.after_open" and n == 2:
                    _wait_drained(state)
            if server.proc is not None and server.proc.poll() is None:
                server.send_signal(signal.SIGTERM)
        code = server.wait(20)
        logs = server.logs()
    finally:
        server.close()
    assert code == -signal.SIGKILL, f"the point was not reached:\n{logs}"
    assert f"sf-crashpoint: SIGKILL at {point} (hit {n})" in logs
    clean_restart(state)
    verdict = oracle.check(state)
    assert verdict.acked >= (RECORDS if point.startswith(("drain.", "sink.", "recover.")) else 0)
    assert verdict.ok, verdict


def _wait_drained(state: Path) -> None:
    import time

    from ._harness import leftovers

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = leftovers(state)
        if not left["log"] and not left["draining"]:
            return
        time.sleep(0.01)
