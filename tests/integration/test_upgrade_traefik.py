"""The runbook's gated blue/green upgrade through real Traefik, under mixed load (the demo's
flow, smaller): candidate verified, `sf-lifecycle rollout` 10 -> 50 -> 100, old drained."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from examples.browser import PageWatch, chromium, open_report
from examples.demo import Options, Summary, run, write_report

pytestmark = pytest.mark.integration

DRAIN_DELAY_S = 5.0


OPTIONS = Options(
    # Two of the four workers are cookie-less: at 10 % the candidate gets ~3 req/s.
    rate=60,
    workers=4,
    sse_clients=2,
    warmup_s=2.0,
    cooldown_s=2.0,
    quiet=True,
    hold="2s",
    min_requests=3,
)


@pytest.fixture(scope="module")
def upgrade() -> Summary:
    return run(OPTIONS)


@pytest.fixture(scope="module")
def report(upgrade: Summary, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The upgrade report of that run, as `make demo` writes it."""
    return write_report(upgrade, OPTIONS, tmp_path_factory.mktemp("report") / "report.html")


def report_data(path: Path) -> dict[str, Any]:
    text = path.read_text()
    start = text.index('<script type="application/json" id="sf-report-data">')
    body = text[text.index(">", start) + 1 : text.index("</script>", start)]
    data: dict[str, Any] = json.loads(body)
    return data


def test_candidate_verified_then_promoted_step_by_step(upgrade: Summary) -> None:
    """Steps: Traefik -> sf-v1 (weights sf 100); load; sf-v2 in the candidate pool, verified
    through its router; rollout 10 -> 50 -> 100, each step passed on Traefik's metrics."""
    assert upgrade.verified["/api/ready"].startswith("200 ")
    assert upgrade.verified["/api/version"].startswith("200 ")
    assert '"replica":"sf-v2"' in upgrade.verified["/api/version"]
    assert upgrade.rollout_exit == 0, upgrade.rollout_report
    report = upgrade.rollout_report
    assert report["result"] == "promoted"
    assert [(s["weight"], s["verdict"]) for s in report["steps"]] == [
        (10, "ok"),
        (50, "ok"),
        (100, "ok"),
    ]
    assert report["weights_after"] == {"sf": 0, "sf-candidate": 100}


def test_no_request_failed(upgrade: Summary) -> None:
    """Every request sent during the whole upgrade got a 2xx."""
    assert upgrade.sent > 100
    assert upgrade.failed_total == 0, upgrade.failed


def test_every_acknowledged_write_delivered_exactly_once(upgrade: Summary) -> None:
    assert len(upgrade.feedback_acked) > 10
    assert upgrade.feedback_lost() == set()
    assert upgrade.feedback_duplicated() == 0
    assert set(upgrade.feedback_delivered) == upgrade.feedback_acked


def test_every_sse_client_received_every_event_once(upgrade: Summary) -> None:
    published = sum(len(v) for v in upgrade.events_published.values())
    assert published > 10
    assert upgrade.events_received
    assert upgrade.sse_gaps_and_duplicates() == (0, 0)
    for client, received in upgrade.events_received.items():
        session = client.split("#", 1)[0]
        assert received == upgrade.events_published[session], client


def test_sticky_clients_were_repinned_to_live_replicas(upgrade: Summary) -> None:
    # Pinned to sf-v1 until its weight went to 0, then re-pinned to sf-v2 at once.
    assert upgrade.sticky_repinned >= 1
    assert set(upgrade.replicas_seen) == {"sf-v1", "sf-v2"}


def test_old_replicas_left_the_pool_and_exited_in_time(upgrade: Summary) -> None:
    assert [s.replica for s in upgrade.stops] == ["sf-v1", "sf-v2"]
    for stop in upgrade.stops:
        assert stop.exit_code == 0, stop
        assert stop.to_pool_exit_s is not None, f"{stop.replica} never left Traefik's pool"
        assert stop.to_exit_s is not None
        assert stop.to_pool_exit_s < stop.to_exit_s
        assert stop.to_exit_s < DRAIN_DELAY_S + 1.0, stop


def test_no_process_left_behind(upgrade: Summary) -> None:
    assert upgrade.leftover_pids == []
    assert len(upgrade.pids) == 4  # sf-v1, Traefik, sf-v2, the rollout command
    for pid in upgrade.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_report_shows_what_happened(upgrade: Summary, report: Path) -> None:
    """The report's data (embedded beside the chart) is the run's: every answered request in
    its replica's bins, the weights Traefik served at each step, each replica's SIGTERM, out of
    pool and exit in that order, the SSE reconnects, and the summary table."""
    data = report_data(report)
    requests = data["requests"]
    assert sum(map(sum, requests.values())) == sum(upgrade.replicas_seen.values())
    assert {k: sum(v) for k, v in requests.items()} == dict(upgrade.replicas_seen)
    bins = data["bins"]
    assert bins[:3] == [0.0, 0.25, 0.5]
    assert data["failures"] == []
    weights = data["weights"]
    assert [w["weights"]["sf-candidate"] for w in weights] == [0, 0, 10, 50, 100]
    times = [w["t"] for w in weights]
    assert times == sorted(times)
    assert 0 <= times[-1] < upgrade.load_s + 10
    instants = data["instants"]
    for replica in ("sf-v1", "sf-v2"):
        kinds = [
            i["kind"] for i in instants if i["replica"] == replica and i["kind"] != "SSE reconnect"
        ]
        assert kinds == ["SIGTERM", "out of pool", "exit"], instants
    reconnects = [i for i in instants if i["kind"] == "SSE reconnect"]
    assert len(reconnects) == len(upgrade.reconnects) >= 1
    summary = {label: value for label, value in data["summary"]}
    assert summary["requests failed"] == "0"
    assert summary["rollout"] == "promoted (exit 0)"
    assert data["verdict"] == "gated blue/green upgrade: OK"
    # plotly.js (~4.8 MB) is most of the file; the run's data adds little.
    assert report.stat().st_size < 5_500_000


def test_report_renders_offline_in_chromium(upgrade: Summary, report: Path) -> None:
    """Steps: Debian's Chromium opens the report file (file://, nothing else reachable).
    Assert: plotly drew the chart (the stacked areas of sf-v1 and sf-v2 have filled paths, the
    weights and instants are plotted), the summary table is there, and the page had no
    console error, no uncaught exception, and made no request beyond the file itself."""
    with chromium() as browser:
        page = browser.new_page()
        watch = PageWatch.on(page)
        open_report(page, report)
        names = page.evaluate("() => document.getElementById('sf-timeline').data.map(t => t.name)")
        # What plotly drew: each trace's name and the number of its SVG paths.
        drawn = page.evaluate(
            """() => Array.from(document.querySelectorAll('#sf-timeline .scatterlayer .trace'))
                 .map(t => [t.__data__[0].trace.name, t.querySelectorAll('path').length])"""
        )
        fills = page.eval_on_selector_all(
            "#sf-timeline .scatterlayer .trace path.js-fill",
            "els => els.map(e => (e.getAttribute('d') || '').length)",
        )
        table = page.eval_on_selector_all(
            "table tr td:first-child", "els => els.map(e => e.textContent)"
        )
        problems = watch.problems()
        requests = list(watch.requests)
        page.close()
    assert names[:3] == ["sf-v1", "sf-v2", "failed (0)"]
    assert "sf (sf-v1)" in names
    assert "sf-candidate (sf-v2)" in names
    assert {"SIGTERM", "out of pool", "exit"} <= set(names)
    paths = dict(drawn)
    assert all(paths[name] > 0 for name in ("sf-v1", "sf-v2", "SIGTERM", "out of pool", "exit"))
    assert len(fills) >= 2
    assert all(length > 100 for length in fills), fills
    assert "requests failed" in table
    assert "rollout" in table
    assert problems == []
    assert requests == [report.resolve().as_uri()]
