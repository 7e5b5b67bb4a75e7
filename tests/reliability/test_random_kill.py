"""Real servers under concurrent appends, SIGKILLed at random instants, restarted.

The bounded run of `make test`; `python -m tests.reliability kill --iterations N` is the long one.
Every fifth iteration is blue/green: a second server starts on the same state dir and recovers
while the first is still draining (and the first is killed mid-drain half of the time).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ._harness import random_kill_campaign

pytestmark = pytest.mark.integration

ITERATIONS = int(os.environ.get("SF_RELIABILITY_KILL_ITERATIONS", "50"))


@pytest.mark.timeout(600)
def test_random_sigkill_under_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    stats, verdict = random_kill_campaign(tmp_path / "state", ITERATIONS, seed=ITERATIONS)
    print(f"{stats}\n{verdict.acked} acknowledged, {verdict.in_sink} in the sink")  # -rP shows it
    assert stats.iterations == ITERATIONS
    assert stats.blue_green == ITERATIONS // 5
    assert verdict.acked > ITERATIONS  # the load really ran: records were acknowledged
    assert stats.statuses[202] == verdict.acked
    assert verdict.ok, verdict
    assert stats.leftover_pids() == []
