"""Hooks are isolated (issue 11, defect 8): whatever one shutdown hook does, the others run.

Each case serves `tests.integration.shutdown_app` with a misbehaving hook registered before
the feedback queue's final drain, and a hook after it that leaves a marker file. Records are
posted with no background drain, so only the final drain can deliver them. On SIGTERM:

- the process exits with a code that says how the shutdown went (5: a hook failed; 4: a hook
  ran out of its share of the budget; 0: a hook that only blocked the loop briefly);
- the final drain still ran: every acknowledged record is in the sink, exactly once, with no
  restart, and nothing is left on disk;
- the hook after it still ran.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from sf_lifecycle import ExitCode
from sf_lifecycle.testing import ServerProcess

from ._harness import BASE_ENV, ROOT, Oracle, post_one

pytestmark = pytest.mark.integration

BUDGET_MS = 3_000

CASES = [
    ("exception", ExitCode.HOOK_FAILED),
    ("cancelled", ExitCode.HOOK_FAILED),  # raises CancelledError nobody sent it
    ("keyboard", ExitCode.HOOK_FAILED),
    ("systemexit", ExitCode.HOOK_FAILED),
    ("baseexception", ExitCode.HOOK_FAILED),
    ("forever", ExitCode.BUDGET_EXCEEDED),  # cancelled at half the budget; the drain gets the rest
    ("ignores-cancel", ExitCode.BUDGET_EXCEEDED),  # swallows cancellation: abandoned
    ("block", ExitCode.OK),  # blocks the loop 0.5 s: slow, not a failure
]


@pytest.mark.parametrize(("hook", "expected"), CASES, ids=[c[0] for c in CASES])
def test_a_misbehaving_hook_does_not_skip_the_final_drain(
    hook: str, expected: int, tmp_path: Path
) -> None:
    """Steps: serve with the hook; post 5 records; SIGTERM; the exit code is `expected`, within
    the budget + 1 s; the 5 records are in the sink and the queue directory holds no segment;
    the later hook's marker exists; the log names the hook."""
    state = tmp_path / "state"
    server = ServerProcess(
        "tests.integration.shutdown_app:app",
        state_dir=state,
        env={
            **BASE_ENV,
            "SF_TEST_HOOK": hook,
            "SF_RPC_SHUTDOWN_GRACE_MS": str(BUDGET_MS),
            "SF_DRAIN_INTERVAL_MS": "3600000",
        },
        cwd=ROOT,
        reap_s=2,
    )
    try:
        server.start()
        server.wait_ready(30)
        oracle = Oracle()
        assert [post_one(server, oracle) for _ in range(5)] == [202] * 5
        server.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = server.wait(30)
        elapsed = time.monotonic() - sent
        logs = server.logs()
    finally:
        server.close()
    assert code == expected, logs
    assert elapsed < BUDGET_MS / 1000 + 1.0, logs
    verdict = oracle.check(state)
    assert verdict.ok, f"{verdict}\n{logs}"
    assert verdict.in_sink == 5
    assert (state / "after-hook-ran").read_text() == "yes"
    if expected == ExitCode.HOOK_FAILED:
        assert "shutdown hook bad-hook failed" in logs
        assert "shutdown hook(s) failed: bad-hook" in logs
    elif expected == ExitCode.BUDGET_EXCEEDED:
        assert "shutdown hook bad-hook cancelled" in logs
    assert "shutdown hook feedback-drain done" in logs
