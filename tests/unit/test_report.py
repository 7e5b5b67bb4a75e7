"""The upgrade report in process: binning, the rollout's counters, the self-contained file."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from sf_lifecycle.report import Instant as At
from sf_lifecycle.report import (
    ReportUnavailable,
    Requests,
    UpgradeTimeline,
    Weights,
    render_html,
    write_report,
)


def embedded(document: str) -> dict[str, Any]:
    m = re.search(r'<script type="application/json" id="sf-report-data">(.*?)</script>', document)
    assert m is not None
    data: dict[str, Any] = json.loads(m.group(1))
    return data


def small() -> UpgradeTimeline:
    tl = UpgradeTimeline("upgrade", 1_800_000_000.0, verdict="OK")
    tl.requests += [
        Requests(0.1, "sf-v1"),
        Requests(0.2, "sf-v1"),
        Requests(0.3, "sf-v1"),
        Requests(0.3, "sf-v2"),
        Requests(0.6, "sf-v2", 1, 1, "HTTP 500"),
        Requests(0.61, "", 1, 1, "ConnectError"),
    ]
    tl.instants += [At(0.4, "sf-v1", "SIGTERM"), At(0.7, "sf-v1", "exit", "code 0")]
    tl.weights += [Weights(0.0, {"sf": 100, "sf-candidate": 0}), Weights(0.35, {"sf": 0})]
    tl.summary = [("requests failed", "2"), ("note", "</script><b>")]
    return tl


def test_requests_are_binned_per_replica_per_250_ms() -> None:
    starts, per = small().traffic()
    assert starts == [0.0, 0.25, 0.5]
    assert per == {"sf-v1": [2, 1, 0], "sf-v2": [0, 1, 1]}  # no lane for "no replica"


def test_failures_are_counted_per_bin_with_what_and_where() -> None:
    assert small().failures() == [
        {"t": 0.5, "failed": 2, "what": {"HTTP 500 (sf-v2)": 1, "ConnectError (no replica)": 1}}
    ]


def test_rollout_counters_become_requests_per_look() -> None:
    """Cumulative counters from Traefik's metrics: each look adds the increase since the one
    before; a counter that went down (Traefik restarted) counts from 0 again."""
    report = {
        "result": "rolled_back",
        "reason": "candidate answered 5xx",
        "weights_after": {"sf": 100, "sf-candidate": 0},
        "steps": [
            {
                "weight": 10,
                "verdict": "breach",
                "held_s": 0.5,
                "stable": {"service": "sf@file", "requests": 9, "errors": 0, "p99_s": 0.01},
                "candidate": {"service": "sf-candidate@file", "requests": 2, "errors": 2},
            }
        ],
        "weights_timeline": [
            {"t": 100.0, "weights": {"sf": 100, "sf-candidate": 0}, "note": "start"},
            {"t": 100.2, "weights": {"sf": 90, "sf-candidate": 10}, "note": "step 10%"},
            {"t": 100.8, "weights": {"sf": 100, "sf-candidate": 0}, "note": "rollback"},
        ],
    }
    samples = [
        (100.1, {"sf": (50.0, 0.0), "sf-candidate": (0.0, 0.0)}),
        (100.5, {"sf": (55.0, 0.0), "sf-candidate": (2.0, 2.0)}),
        (100.7, {"sf": (3.0, 0.0), "sf-candidate": (2.0, 2.0)}),
    ]
    tl = UpgradeTimeline.from_rollout(report, samples)
    assert tl.started_at == 100.0
    got = [(round(r.t, 3), r.replica, r.n, r.failed) for r in tl.requests]
    assert got == [(0.5, "sf", 5, 0), (0.5, "sf-candidate", 2, 2), (0.7, "sf", 3, 0)]
    assert [(round(w.t, 3), w.weights["sf-candidate"], w.note) for w in tl.weights] == [
        (0.0, 0, "start"),
        (0.2, 10, "step 10%"),
        (0.8, 0, "rollback"),
    ]
    assert tl.summary[0] == ("rollout", "rolled_back")
    assert tl.summary[1][0] == "step 10%"
    assert "sf-candidate@file 2 req, 2 5xx, p99 -" in tl.summary[1][1]
    assert ("why", "candidate answered 5xx") in tl.summary
    assert tl.verdict == "rollout rolled_back"
    assert tl.ok is False


def test_the_file_is_self_contained_and_carries_its_data(tmp_path: Path) -> None:
    """One file: plotly.js inlined (no `src=`, no CDN), the summary escaped, the binned data
    embedded as JSON that reads back; written atomically (no temporary file left)."""
    path = write_report(small(), tmp_path / "out" / "report.html")
    document = path.read_text()
    # Every script is inline; nothing is loaded from elsewhere (the browser test checks that
    # no request leaves the file at run time).
    assert not re.search(r"<script[^>]*\bsrc=", document)
    assert document.count('<script type="application/json" id="sf-report-data">') == 1
    assert not re.search(r'<(link|img|iframe)[^>]+(src|href)="https?:', document)
    assert "<td>&lt;/script&gt;&lt;b&gt;</td>" in document
    data = embedded(document)
    assert data["requests"] == {"sf-v1": [2, 1, 0], "sf-v2": [0, 1, 1]}
    assert data["summary"][1] == ["note", "</script><b>"]
    assert [i["kind"] for i in data["instants"]] == ["SIGTERM", "exit"]
    assert data["weights"][1] == {"t": 0.35, "weights": {"sf": 0}, "note": ""}
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]
    # plotly.js (about 4.8 MB) is the file; this timeline adds a few kilobytes.
    assert 3_000_000 < path.stat().st_size < 5_500_000


def test_an_empty_timeline_still_renders() -> None:
    data = embedded(render_html(UpgradeTimeline("nothing happened", 0.0)))
    assert data["bins"] == [0.0]
    assert data["requests"] == {}


def test_without_plotly_the_error_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "plotly", None)
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(ReportUnavailable, match=r"pip install 'sf-lifecycle\[report\]'"):
        write_report(small(), tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []
