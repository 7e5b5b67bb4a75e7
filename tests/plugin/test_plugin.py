"""The pytest plugin, tested as a user meets it: inner pytest sessions run by `pytester`.

Each inner session is a subprocess that loads the plugin through its `pytest11` entry point and
starts real servers (the example server, and `apps/notes.py`, whose sink can drop records).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from .conftest import ROOT, RunInner

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.integration

README_EXAMPLE = (Path(__file__).parent / "readme_example.py").read_text()

NOTES_TESTS = """
import json, time
import pytest
from sf_lifecycle.testing import CrashPointMissed, assert_delivered_once, sqlite_sink_ids

APP = "tests.plugin.apps.notes:app"
HOLD = {"SF_DRAIN_INTERVAL_MS": "60000"}


def test_notes_survive_a_kill_mid_drain_and_a_kill_after_append(sf_service):
    svc = sf_service(APP, env=HOLD)
    acked = [svc.post_json("/api/feedback", {"note": i})["id"] for i in range(9)]
    killed = svc.kill_during_drain("drain.after_sink_commit")
    assert killed.exit_code == -9
    assert killed.timeline.crash_point == "drain.after_sink_commit"
    assert killed.timeline.names[0] == "signal"

    second = svc.restart()
    assert second.state_dir == svc.state_dir and second.pid != svc.pid
    acked += [second.post_json("/api/feedback", {"note": i})["id"] for i in range(9, 12)]
    second.kill_after_append()  # durable, never acknowledged

    third = second.restart()
    shutdown = third.terminate_and_wait()
    assert shutdown.exit_code == 0, third.logs()
    report = assert_delivered_once(acked, state_dir=svc.state_dir, unacknowledged=1)
    assert len(report.unknown) == 1


def test_kill_during_drain_says_so_when_nothing_was_queued(sf_service):
    svc = sf_service(APP)  # default drain interval: the background drainer delivers it
    rid = svc.post_json("/api/feedback", {"note": 1})["id"]
    deadline = time.monotonic() + 10
    while rid not in sqlite_sink_ids(svc.state_dir / "feedback.sqlite3"):
        assert time.monotonic() < deadline, svc.logs()
        time.sleep(0.02)
    with pytest.raises(CrashPointMissed, match="exited with 0"):
        svc.kill_during_drain()


def test_terminate_and_wait_reports_the_timeline(sf_service):
    svc = sf_service(APP, env=HOLD)
    ids = [svc.post_json("/api/feedback", {"note": i})["id"] for i in range(3)]
    shutdown = svc.terminate_and_wait()
    t = shutdown.timeline
    assert shutdown.exit_code == 0
    assert t.names == [
        "signal", "first_503", "listeners_closed", "in_flight_done", "drain_done",
        "hook_done", "exit",
    ], str(t)
    assert 0.2 <= t.listeners_closed_s < 2.0, str(t)
    assert t.first_503_s < t.listeners_closed_s <= t.drain_done_s
    assert t.drained_records == 3
    assert_delivered_once(ids, state_dir=svc.state_dir)


def test_traefik_in_front_of_a_replica(sf_service, sf_traefik):
    svc = sf_service(APP)
    proxy = sf_traefik(svc)
    status, headers, body = proxy.request(
        "/api/feedback", method="POST", body=b'{"via": "traefik"}',
        headers={"content-type": "application/json"},
    )
    assert status == 202, body
    assert proxy.sticky_cookie(headers) is not None
    assert svc.terminate_and_wait().exit_code == 0
    assert_delivered_once([json.loads(body)["id"]], state_dir=svc.state_dir)
"""

LOSSY_TEST = """
import json, os
from sf_lifecycle.testing import assert_delivered_once


def test_lossy_sink(sf_service):
    svc = sf_service(
        "tests.plugin.apps.notes:app",
        env={"SF_DRAIN_INTERVAL_MS": "60000", "NOTES_SINK_DROP_EVERY": "3"},
    )
    acked = [svc.post_json("/api/feedback", {"note": i})["id"] for i in range(9)]
    svc.kill_during_drain()
    nxt = svc.restart()
    with open(os.environ["OUT"], "w") as f:
        json.dump({"acked": acked, "pids": [svc.pid, nxt.pid]}, f)
    assert nxt.terminate_and_wait().exit_code == 0
    assert_delivered_once(acked, state_dir=svc.state_dir)
"""


def test_readme_example_passes_against_the_example_server(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    """1. The README's example, verbatim, with `myapp` being the example server.
    2. It passes, as do the notes app's tests (kill mid-drain, kill after append, the
       timeline, Traefik in front) and the check that a missed crash point is reported.
    """
    pytester.makepyfile(myapp="from examples.sf_server import app  # noqa: F401\n")
    pytester.makepyfile(test_readme=README_EXAMPLE, test_notes=NOTES_TESTS)
    result = run_inner()
    result.assert_outcomes(passed=5)


def test_a_sink_that_drops_records_fails_with_the_lost_ids(
    pytester: pytest.Pytester, run_inner: RunInner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. The notes app with a sink dropping every 3rd record; 9 writes acknowledged.
    2. Kill mid-drain (nothing delivered), restart: recovery hands all 9 to the sink in order.
    3. The inner test fails; its message lists exactly ids 3, 6 and 9 as lost, and the
       servers' logs are attached. 4. Both servers were reaped.
    """
    out = pytester.path / "out.json"
    monkeypatch.setenv("OUT", str(out))
    pytester.makepyfile(test_lossy=LOSSY_TEST)
    result = run_inner()
    result.assert_outcomes(failed=1)
    facts = json.loads(out.read_text())
    acked, pids = facts["acked"], facts["pids"]
    lost = acked[2::3]
    text = result.stdout.str()
    assert f"lost (acknowledged, never delivered): 3: {', '.join(lost)}" in text, text
    assert "9 acknowledged write(s) NOT delivered exactly once" in text
    assert "duplicated (delivered more than once): none" in text
    assert "left in .draining (not delivered yet): none" in text
    for kept in set(acked) - set(lost):
        assert kept not in re.findall(r"lost \(.*", text)[0]
    assert "sf-lifecycle server <Service tests.plugin.apps.notes:app" in text
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_readme_shows_the_example() -> None:
    """The README carries the exact example this suite runs (so it cannot drift)."""
    assert README_EXAMPLE in (ROOT / "README.md").read_text()
