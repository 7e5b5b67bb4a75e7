"""Parsing the shutdown timeline from a real-shaped server log."""

from __future__ import annotations

from pathlib import Path

import pytest

from sf_lifecycle.testing import Service, parse_timeline

LOG = """\
2026-11-27 21:31:30,355 INFO    uvicorn.error: Started server process [18206]
2026-11-27 21:31:30,356 INFO    sf_lifecycle.lifecycle: ready after 11 ms
2026-11-27 21:31:30,380 INFO    sf_lifecycle.queue: queue drained 2 record(s) in 3 ms
2026-11-27 21:31:30,409 INFO    sf_lifecycle.runner: received SIGTERM: draining; healthz answers 503
2026-11-27 21:31:30,459 INFO    sf_lifecycle.health: first 503 health probe served 50 ms after
2026-11-27 21:31:30,659 INFO    sf_lifecycle.runner: drain delay over after 250 ms (5 probe(s) \
answered 503); closing listeners, 0 request(s) in flight
2026-11-27 21:31:30,760 INFO    sf_lifecycle.lifecycle: in-flight requests finished 351 ms after
2026-11-27 21:31:30,767 INFO    sf_lifecycle.queue: queue drained 3 record(s) in 7 ms
2026-11-27 21:31:30,769 INFO    sf_lifecycle.lifecycle: shutdown hook feedback-drain done in 9 ms
2026-11-27 21:31:30,769 INFO    sf_lifecycle.runner: exit 0, 360 ms after the signal
"""


def test_events_in_order_with_times_relative_to_the_signal() -> None:
    t = parse_timeline(LOG)
    assert t.names == [
        "drain_done",
        "signal",
        "first_503",
        "listeners_closed",
        "in_flight_done",
        "drain_done",
        "hook_done",
        "exit",
    ]
    assert t.at("drain_done") == pytest.approx(-0.029)
    assert t.first_503_s == pytest.approx(0.05)
    assert t.listeners_closed_s == pytest.approx(0.25)
    assert t.drain_done_s == pytest.approx(0.358)
    assert t.drained_records == 3
    assert t.crash_point is None
    exit_event = t.first("exit")
    assert exit_event is not None
    assert exit_event.detail == {"code": "0"}
    assert "+250 ms  listeners_closed" in str(t)


def test_a_crash_line_takes_the_time_of_the_line_before() -> None:
    t = parse_timeline(
        [*LOG.splitlines()[:7], "sf-crashpoint: SIGKILL at drain.after_rename (hit 1)"]
    )
    assert t.names[-1] == "crash"
    assert t.crash_point == "drain.after_rename"
    assert t.at("crash") == pytest.approx(0.351)
    assert t.drained_records == 2  # only the background drain before the signal
    assert parse_timeline("").events == ()


def test_arming_an_unknown_crash_point_is_refused(tmp_path: Path) -> None:
    svc = Service("examples.sf_server:app", state_dir=tmp_path / "state")
    try:
        with pytest.raises(ValueError, match=r"unknown crash point 'drain\.typo'"):
            svc.arm("drain.typo")
        with pytest.raises(ValueError, match="positive integer"):
            svc.arm("drain.after_rename:0")
    finally:
        svc.close()
