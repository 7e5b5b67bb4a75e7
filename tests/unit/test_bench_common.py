"""The benchmark suite's pure helpers: statistics, interleaving, rows, table, results file.

Nothing here is timed: the benchmarks measure, these tests only check the bookkeeping that turns
measurements into the table and `latest.json`. One integration test runs the fallback load
generator against a real uvicorn for a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _report
from benchmarks.__main__ import run_module, select
from benchmarks._common import (
    Stats,
    UvicornProcess,
    _parse_wrk,
    interleave,
    make_result,
    median,
    run_load,
    spread,
)


def row(name: str = "x", **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "unit": "req/s",
        "value": 980.0,
        "baseline_name": "bare",
        "baseline_value": 1000.0,
        "ratio": 0.98,
        "goal": ">= 0.97x bare",
        "met": True,
    }
    base.update(kw)
    return base


def test_median_and_spread() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert spread([3.0, 1.0, 2.0]) == (1.0, 3.0)
    with pytest.raises(ValueError, match="no samples"):
        median([])
    with pytest.raises(ValueError, match="no samples"):
        spread([])
    assert Stats.of([5.0, 1.0, 3.0]) == Stats(median=3.0, low=1.0, high=5.0, n=3)


def test_interleave_alternates_variants_round_by_round() -> None:
    calls: list[str] = []

    def variant(label: str) -> Any:
        def run() -> str:
            calls.append(label)
            return f"{label}{len(calls)}"

        return run

    a, b = interleave(3, variant("A"), variant("B"))
    assert calls == ["A", "B", "A", "B", "A", "B"]
    assert a == ["A1", "A3", "A5"]
    assert b == ["B2", "B4", "B6"]
    with pytest.raises(ValueError, match="rounds"):
        interleave(0, variant("A"))


def test_make_result_has_the_contract_keys_and_the_ratio_of_medians() -> None:
    r = make_result(
        "t", "req/s", Stats.of([90.0, 95.0]), Stats.of([100.0]), "bare", ">= 0.9x", True
    )
    assert set(_report.REQUIRED_KEYS) <= set(r)
    assert r["value"] == 92.5
    assert r["baseline_value"] == 100.0
    assert r["ratio"] == pytest.approx(0.925)
    assert r["spread"] == [90.0, 95.0]
    alone = make_result("t", "s", Stats.of([1.0]), None, "-", "< 2 s", True)
    assert alone["ratio"] is None
    assert alone["baseline_value"] is None


def test_normalize_fills_ratio_coerces_figures_and_rejects_missing_keys() -> None:
    r = _report.normalize(row(value=50, baseline_value=200, ratio=None, met=0), "bench_x")
    assert r["ratio"] == 0.25
    assert isinstance(r["value"], float)
    assert r["met"] is False
    assert r["module"] == "bench_x"
    broken = row()
    del broken["goal"]
    with pytest.raises(ValueError, match="lacks goal"):
        _report.normalize(broken, "bench_x")
    with pytest.raises(ValueError, match="not a dict"):
        _report.normalize(["x"], "bench_x")


def test_fmt_number() -> None:
    assert _report.fmt_number(12345.6) == "12,346"
    assert _report.fmt_number(123.4) == "123"
    assert _report.fmt_number(12.34) == "12.3"
    assert _report.fmt_number(1.234) == "1.23"
    assert _report.fmt_number(0.1234) == "0.123"
    assert _report.fmt_number(None) == "-"


def test_table_shows_figures_ratio_goal_met_errors_and_previous_run() -> None:
    rows = [
        row("throughput", spread=[950.0, 990.0], detail="3 rounds"),
        row("latency", unit="s", value=1.5, baseline_value=None, ratio=None, met=False),
        _report.error_row("bench_broken", RuntimeError("server never became ready")),
    ]
    previous = [row("throughput", ratio=0.91), row("throughput", baseline_name="other", ratio=3.0)]
    table = _report.render_table(rows, previous)
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "benchmark"
    throughput = next(ln for ln in lines if ln.startswith("| throughput"))
    cells = [c.strip() for c in throughput.strip("|").split("|")]
    assert cells == [
        "throughput [1]",
        "980 req/s [950..990]",
        "bare",
        "1,000 req/s",
        "0.98x",
        ">= 0.97x bare",
        "yes",
        "0.91x",
    ]
    latency = next(ln for ln in lines if ln.startswith("| latency"))
    assert "| NO " in latency
    assert "| - " in latency  # no previous figure, no ratio
    broken = next(ln for ln in lines if ln.startswith("| bench_broken: ERROR"))
    assert "| ERROR " in broken
    assert "[1] throughput: 3 rounds" in lines
    assert "[2] bench_broken: ERROR: RuntimeError: server never became ready" in lines
    # Every table line has the same width, so it reads as a table in a terminal too.
    assert len({len(ln) for ln in lines[: len(rows) + 2]}) == 1


def test_write_results_keeps_the_previous_run(tmp_path: Path) -> None:
    first = _report.write_results(tmp_path, {"date": "1", "results": []})
    _report.write_results(tmp_path, {"date": "2", "results": []})
    assert json.loads(first.read_text())["date"] == "2"
    assert json.loads((tmp_path / "previous.json").read_text())["date"] == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "previous.json"]


def test_machine_line_names_cores_and_python() -> None:
    info = _report.machine_info()
    line = _report.machine_line("2025-01-01T00:00:00Z", info, quick=True)
    assert f"{info['cores']} cores" in line
    assert info["python"] in line
    assert line.endswith("(quick run)")


def test_select_accepts_short_names_and_rejects_unknown_ones() -> None:
    names = ["bench_middleware", "bench_shutdown"]
    assert select(names, []) == names
    assert select(names, ["shutdown"]) == ["bench_shutdown"]
    assert select(names, ["bench_middleware"]) == ["bench_middleware"]
    with pytest.raises(SystemExit, match="unknown benchmark"):
        select(names, ["nope"])


def test_a_module_that_fails_becomes_an_error_row() -> None:
    rows, _seconds, error = run_module("bench_does_not_exist", quick=True)
    assert error is not None
    assert "ModuleNotFoundError" in error
    assert rows[0]["name"] == "bench_does_not_exist: ERROR"
    assert rows[0]["met"] is None


def test_parse_wrk_summary() -> None:
    out = (
        "Running 2s test @ http://127.0.0.1:1/\n"
        'SFBENCH {"requests":2000,"duration_us":2000000,"connect":0,"read":1,"write":0,'
        '"status":5,"timeout":2}\n'
    )
    result = _parse_wrk(out)
    assert (result.requests, result.errors, result.non_2xx) == (2000, 3, 5)
    assert result.rps == pytest.approx(997.5)
    with pytest.raises(RuntimeError, match="no summary"):
        _parse_wrk("garbage")


def test_load_generators_refuse_anything_but_loopback() -> None:
    with pytest.raises(ValueError, match=r"only talk to 127\.0\.0\.1"):
        run_load("http://localhost:8000/", duration_s=1)
    with pytest.raises(ValueError, match=r"only talk to 127\.0\.0\.1"):
        run_load("http://10.0.0.1:8000/", duration_s=1)


@pytest.mark.integration
def test_python_load_generator_stops_at_its_request_cap() -> None:
    """Steps: start a bare app under plain uvicorn; run the fallback generator with a small cap
    and a long duration; it must stop at the cap (plus at most one request per connection)
    long before the duration, with every response a 200."""
    with UvicornProcess("benchmarks._apps:bare_app", factory=True) as server:
        server.wait_ready(path="/")
        result = run_load(
            f"{server.url}/", duration_s=30, connections=4, max_requests=200, tool="python"
        )
    assert 200 <= result.requests <= 204
    assert result.seconds < 15
    assert (result.errors, result.non_2xx) == (0, 0)
    assert result.tool == "python"
