"""Background tasks never die of what a sink raises (start-up recovery, the drainer).

A sink may raise any `BaseException`: a `CancelledError` nobody sent (it awaited a future
another task cancelled), `SystemExit`, `KeyboardInterrupt`. Served by `sf-lifecycle serve`,
each is a failure of that one sink call: logged, retried, and the process serves on and shuts
down cleanly. Before the fix, `cancelled` killed the task silently (an orphan never recovered,
keyed writes 503 for ever; or a dead drainer and exit 5 with every record left on disk) and
`systemexit`/`keyboard` ended the serving process at once, with no drain.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from sf_lifecycle import ExitCode
from sf_lifecycle.testing import ServerProcess

from ._harness import BASE_ENV, ROOT, Oracle, leftovers, post_one, sink_rows

pytestmark = pytest.mark.integration

APP = "tests.integration.shutdown_app:app"
KINDS = ["cancelled-once", "systemexit-once", "keyboard-once"]
NO_BACKGROUND_DRAIN = {"SF_DRAIN_INTERVAL_MS": "3600000"}


def start(servers: list[ServerProcess], state: Path, env: dict[str, str]) -> ServerProcess:
    server = ServerProcess(APP, state_dir=state, env={**BASE_ENV, **env}, cwd=ROOT, reap_s=2)
    servers.append(server)
    server.start()
    server.wait_ready(30)
    return server


def sigterm_exit(server: ServerProcess) -> int:
    server.send_signal(signal.SIGTERM)
    return server.wait(30)


@pytest.mark.parametrize("sink", KINDS)
def test_startup_recovery_retries_after_a_sink_raised_a_base_exception(
    sink: str, servers: list[ServerProcess], tmp_path: Path
) -> None:
    """Steps:
    1. serve with no background drain, post 3 records (acknowledged), SIGKILL: an orphan;
    2. restart with a sink whose first call (the start-up recovery) raises `sink`;
    3. ready turns 200 only once recovery was retried and delivered the 3 records; the log
       names the failed attempt; the process is alive;
    4. SIGTERM: exit 0, every acknowledged record in the sink once, nothing left on disk.
    """
    state = tmp_path / "state"
    first = start(servers, state, NO_BACKGROUND_DRAIN)
    oracle = Oracle()
    assert [post_one(first, oracle) for _ in range(3)] == [202] * 3
    first.kill()
    assert len(leftovers(state)["log"]) == 1
    second = start(servers, state, {"SF_TEST_SINK": sink})
    assert len(sink_rows(state)) == 3, second.logs()
    assert "start-up task feedback-recovery failed (attempt 1)" in second.logs()
    assert sigterm_exit(second) == ExitCode.OK, second.logs()
    verdict = oracle.check(state)
    assert verdict.ok, f"{verdict}\n{second.logs()}"
    assert verdict.in_sink == 3


@pytest.mark.parametrize("sink", KINDS)
def test_background_drainer_lives_on_after_a_sink_raised_a_base_exception(
    sink: str, servers: list[ServerProcess], tmp_path: Path
) -> None:
    """Steps:
    1. serve with a sink whose first call (the first background drain) raises `sink`;
    2. post 3 records: the drainer fails once, logs it, and delivers them on its next period;
       the process is still serving;
    3. post 2 more; SIGTERM: exit 0, the 5 records in the sink once, nothing left on disk.
    """
    state = tmp_path / "state"
    server = start(servers, state, {"SF_TEST_SINK": sink})
    oracle = Oracle()
    assert [post_one(server, oracle) for _ in range(3)] == [202] * 3
    deadline = time.monotonic() + 10
    while len(sink_rows(state)) < 3:
        assert time.monotonic() < deadline, server.logs()
        time.sleep(0.05)
    assert server.proc is not None
    assert server.proc.poll() is None, server.logs()
    assert "background drain failed" in server.logs()
    assert [post_one(server, oracle) for _ in range(2)] == [202] * 2
    assert sigterm_exit(server) == ExitCode.OK, server.logs()
    verdict = oracle.check(state)
    assert verdict.ok, f"{verdict}\n{server.logs()}"
    assert verdict.in_sink == 5
