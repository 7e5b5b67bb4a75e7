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


#: Text that breaks out of a `<script>` element unless every `<` is escaped: `<!--<script>`
#: makes the HTML parser skip the next `</script>`.
HOSTILE = "<!--<script>\"'</script><img src=x onerror=alert(1)>&amp;\u2028\u2029%{x}"


def hostile() -> UpgradeTimeline:
    """Hostile text in every text field of a timeline."""
    tl = UpgradeTimeline(HOSTILE, 1_800_000_000.0, verdict=HOSTILE, ok=False)
    tl.requests += [Requests(0.1, "sf-v1"), Requests(0.2, HOSTILE, 1, 1, HOSTILE)]
    tl.instants += [At(0.3, HOSTILE, "SIGTERM", HOSTILE), At(0.4, HOSTILE, HOSTILE, HOSTILE)]
    tl.weights += [Weights(0.0, {HOSTILE: 100}, HOSTILE)]
    tl.pools = {HOSTILE: HOSTILE}
    tl.summary = [(HOSTILE, HOSTILE)]
    return tl


def test_embedded_json_escapes_every_character_that_could_end_the_script() -> None:
    """`<`, `>`, `&`, U+2028 and U+2029 appear only as `\\uXXXX` in the embedded data, so no
    text can end the element or open a comment in it; the JSON reads back unchanged."""
    document = render_html(hostile())
    start = document.index('<script type="application/json" id="sf-report-data">')
    raw = document[document.index(">", start) + 1 : document.index("</script>", start)]
    assert not set(raw) & {"<", ">", "&", "\u2028", "\u2029"}
    data = json.loads(raw)
    assert data["title"] == data["verdict"] == HOSTILE
    assert data["summary"] == [[HOSTILE, HOSTILE]]
    assert data["failures"][0]["what"] == {f"{HOSTILE} ({HOSTILE})": 1}
    assert data["instants"][0]["detail"] == HOSTILE
    assert data["weights"][0] == {"t": 0.0, "weights": {HOSTILE: 100}, "note": HOSTILE}
    assert data["pools"] == {HOSTILE: HOSTILE}


def test_traffic_is_drawn_from_each_bin_start_to_its_end() -> None:
    """The stacked areas step ("hv") from each bin's start, and a last point closes the last
    bin: a replica's traffic ends at the end of its last bin, not half a bin later."""
    from sf_lifecycle.report import _figure

    tl = small()
    fig = _figure(tl)
    traffic = {t.name: t for t in fig.data if t.stackgroup == "traffic"}
    assert set(traffic) == {"sf-v1", "sf-v2"}
    for name, trace in traffic.items():
        assert list(trace.x) == [0.0, 0.25, 0.5, 0.75], name
        assert trace.line.shape == "hv"
    assert list(traffic["sf-v1"].y) == [2, 1, 0, 0]
    assert list(traffic["sf-v2"].y) == [0, 1, 1, 1]


def test_a_failed_write_names_the_report_path_not_the_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(OSError, match=r"^cannot write ") as caught:
        write_report(small(), target)
    assert str(caught.value) == f"cannot write {target}: Is a directory"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left


def test_report_path_problem_says_why_a_path_cannot_take_the_report(tmp_path: Path) -> None:
    from sf_lifecycle.report import report_path_problem

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert report_path_problem(tmp_path / "report.html") is None
    assert report_path_problem(tmp_path / "new" / "dir" / "report.html") is None  # created
    assert report_path_problem(tmp_path) == "is a directory (give a file name)"
    assert report_path_problem(a_file / "report.html") == f"{a_file} is not a directory"
    problem = report_path_problem("/proc/report.html")  # not writable, even by root
    assert problem is not None
    assert problem.startswith("cannot create a file in /proc: ")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # the check leaves nothing


def test_the_demo_refuses_an_unwritable_report_path_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make demo --report DIR` fails at once (exit 2) naming the path and why, instead of
    after a whole run with a message about a temporary file. (Were the check missing, this
    would run the whole demo and return 0 or 1.)"""
    from examples.demo import main

    assert main(["--report", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert err == f"demo: --report {tmp_path}: is a directory (give a file name)\n"
    assert out == ""
    assert list(tmp_path.iterdir()) == []
