"""Real servers under concurrent appends, SIGKILLed at random instants, restarted.

The bounded run of `make test`; `python -m tests.reliability kill --iterations N` is the long one.
Every fifth iteration is blue/green: a second server starts on the same state dir and recovers
while the first is still draining (and the first is killed mid-drain half of the time). It runs
with the default SQLite sink and with the PostgreSQL sink (`SF_DATABASE_URL`, a real server).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sf_lifecycle.testing import PostgresServer

from ._harness import random_kill_campaign

pytestmark = pytest.mark.integration

ITERATIONS = int(os.environ.get("SF_RELIABILITY_KILL_ITERATIONS", "50"))
#: The PostgreSQL sink's run in `make test` is shorter: the same code paths, another sink.
PG_ITERATIONS = int(os.environ.get("SF_RELIABILITY_KILL_ITERATIONS_PG", "10"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sink", ["sqlite", "postgres"])
def test_random_sigkill_under_load_loses_and_duplicates_nothing(
    tmp_path: Path, sink: str, request: pytest.FixtureRequest
) -> None:
    database_url = None
    iterations = ITERATIONS
    if sink == "postgres":
        server: PostgresServer = request.getfixturevalue("sf_postgres")
        database_url = server.create_database("kill")
        iterations = PG_ITERATIONS
    stats, verdict = random_kill_campaign(
        tmp_path / "state", iterations, seed=iterations, database_url=database_url
    )
    print(f"{stats}\n{verdict.acked} acknowledged, {verdict.in_sink} in the sink")  # -rP shows it
    assert stats.iterations == iterations
    assert stats.blue_green == iterations // 5
    assert verdict.acked > iterations  # the load really ran: records were acknowledged
    assert stats.statuses[202] == verdict.acked
    assert verdict.ok, verdict
    assert stats.leftover_pids() == []
