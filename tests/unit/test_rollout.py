"""`sf-lifecycle rollout` in process: metrics parser, weights file, roles, gate, CLI errors."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import yaml

from sf_lifecycle._prometheus import (
    ServiceStats,
    histogram_quantile,
    parse_samples,
    service_stats,
)
from sf_lifecycle._weights import WeightsError, WeightsFile, split_provider
from sf_lifecycle.cli import main
from sf_lifecycle.rollout import Gate, parse_steps, qualify

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_WEIGHTS = ROOT / "infra" / "traefik" / "dynamic" / "weights.yaml"


# -- Prometheus text format -------------------------------------------------------------------
SCRAPE = """\
# HELP traefik_service_requests_total How many HTTP requests processed on a service.
# TYPE traefik_service_requests_total counter
traefik_service_requests_total{code="200",method="GET",protocol="http",service="sf@file"} 90
traefik_service_requests_total{code="500",method="GET",protocol="http",service="sf@file"} 1
traefik_service_requests_total{code="200",method="POST",protocol="http",service="sf@file"} 9
traefik_service_requests_total{code="503",method="GET",service="sf-candidate@file"} 3
traefik_service_requests_total{code="200",method="GET",service="sf-candidate@file"} 7
traefik_service_request_duration_seconds_bucket{code="200",service="sf@file",le="0.1"} 80
traefik_service_request_duration_seconds_bucket{code="200",service="sf@file",le="0.5"} 99
traefik_service_request_duration_seconds_bucket{code="200",service="sf@file",le="+Inf"} 100
traefik_service_server_up{service="sf@file",url="http://127.0.0.1:4000"} 1 1700000000000
go_gc_duration_seconds{quantile="0.5"} NaN
process_start_time_seconds 1.7e+09
"""


def test_parse_samples_reads_labels_values_and_skips_comments() -> None:
    samples = list(parse_samples(SCRAPE))
    assert len(samples) == 11
    first = samples[0]
    assert first.name == "traefik_service_requests_total"
    assert first.labels == {
        "code": "200",
        "method": "GET",
        "protocol": "http",
        "service": "sf@file",
    }
    assert first.value == 90
    assert samples[7].labels["le"] == "+Inf"
    assert samples[8].value == 1  # the timestamp is not the value
    assert math.isnan(samples[9].value)
    assert samples[10].labels == {}
    assert samples[10].value == 1.7e9


def test_parse_samples_unescapes_label_values() -> None:
    text = 'm{path="a\\"b\\\\c\\nd", x = "}" ,} 2\nm{} +Inf\n'
    got = list(parse_samples(text))
    assert got[0].labels == {"path": 'a"b\\c\nd', "x": "}"}
    assert got[0].value == 2
    assert got[1].value == math.inf


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('m{code="200" 3', "malformed labels"),
        ("m{code=200} 3", "malformed labels"),
        ("m", "expected a value"),
        ("m 1 2 3", "expected a value"),
        ("m abc", "bad value 'abc'"),
        ('{x="1"} 3', "no metric name"),
    ],
)
def test_parse_samples_rejects_malformed_lines_with_their_number(line: str, problem: str) -> None:
    with pytest.raises(ValueError, match=rf"metrics line 2: {problem}"):
        list(parse_samples(f"ok 1\n{line}\n"))


def test_service_stats_sums_codes_and_methods_per_service() -> None:
    stats = service_stats(SCRAPE)
    assert set(stats) == {"sf@file", "sf-candidate@file"}
    sf, cand = stats["sf@file"], stats["sf-candidate@file"]
    assert (sf.requests, sf.errors) == (100, 1)
    assert (cand.requests, cand.errors, cand.error_ratio) == (10, 3, 0.3)
    assert sf.buckets == {0.1: 80, 0.5: 99, math.inf: 100}
    # 99th of 100 lands at the top of the (0.1, 0.5] bucket.
    assert sf.p99_s() == pytest.approx(0.5)
    assert cand.p99_s() is None


def test_histogram_quantile_interpolates_like_promql() -> None:
    buckets = {0.1: 50.0, 0.2: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)  # lowest bucket starts at 0
    # A rank in +Inf answers the highest finite bound.
    assert histogram_quantile(0.99, {0.1: 10.0, math.inf: 20.0}) == 0.1
    assert histogram_quantile(0.99, {}) is None
    assert histogram_quantile(0.99, {0.1: 0.0, math.inf: 0.0}) is None


def test_since_subtracts_and_survives_a_counter_reset() -> None:
    before = ServiceStats(100, 5, {0.1: 90, math.inf: 100})
    now = ServiceStats(130, 8, {0.1: 110, math.inf: 130})
    d = now.since(before)
    assert (d.requests, d.errors, d.buckets) == (30, 3, {0.1: 20, math.inf: 30})
    restarted = ServiceStats(7, 1, {0.1: 7, math.inf: 7})  # Traefik restarted: counters from 0
    d = restarted.since(before)
    assert (d.requests, d.errors, d.buckets[math.inf]) == (7, 1, 7)


# -- gate arithmetic --------------------------------------------------------------------------
def test_error_breach_divides_by_min_requests_until_there_are_enough() -> None:
    gate = Gate(max_error_rate=0.05, min_requests=20)
    stable = ServiceStats(1000, 0)
    assert gate.error_breach(ServiceStats(5, 0), stable) is None
    # 1 error in 3 requests: 1/20 = 5% is not over 5% yet; 2 errors are (10%).
    assert gate.error_breach(ServiceStats(3, 1), stable) is None
    reason = gate.error_breach(ServiceStats(3, 2), stable)
    assert reason is not None
    assert "5xx to 2 of 3 requests (66.7%), over --max-error-rate 5.0%; stable 0.0%" in reason
    # With enough traffic the ratio itself counts.
    assert gate.error_breach(ServiceStats(100, 5), stable) is None
    assert gate.error_breach(ServiceStats(100, 6), stable) is not None


def test_error_breach_names_a_failing_stable() -> None:
    gate = Gate(max_error_rate=0.01, min_requests=10)
    reason = gate.error_breach(ServiceStats(50, 10), ServiceStats(100, 20))
    assert reason is not None
    assert "stable 20.0% (the stable fails too" in reason


def test_end_of_hold_requires_traffic_and_judges_latency_against_the_stable() -> None:
    gate = Gate(max_error_rate=0.01, max_latency_ratio=2.0, latency_floor_s=0.1, min_requests=10)
    fast = {0.05: 100.0, 0.1: 100.0, 0.5: 100.0, math.inf: 100.0}
    slow = {0.05: 0.0, 0.1: 0.0, 0.5: 100.0, math.inf: 100.0}
    stable = ServiceStats(100, 0, fast)
    few = gate.end_of_hold(ServiceStats(9, 0, fast), stable)
    assert few is not None
    assert "served 9 requests in the hold, fewer than --min-requests 10" in few
    assert gate.end_of_hold(ServiceStats(100, 0, fast), stable) is None
    reason = gate.end_of_hold(ServiceStats(100, 0, slow), stable)
    assert reason is not None
    assert reason == (
        "candidate p99 496ms over 100ms (stable p99 50ms x --max-latency-ratio 2, floor 100ms)"
    )
    # Under the floor, a 2x slower candidate passes: the buckets cannot tell.
    tiny = {0.005: 0.0, 0.01: 100.0, math.inf: 100.0}
    assert (
        gate.end_of_hold(
            ServiceStats(100, 0, tiny), ServiceStats(100, 0, {0.005: 100.0, math.inf: 100.0})
        )
        is None
    )
    # No stable reference: the latency gate does not apply, errors still do.
    assert gate.end_of_hold(ServiceStats(100, 0, slow), ServiceStats(3, 0, fast)) is None
    assert gate.end_of_hold(ServiceStats(100, 2, slow), ServiceStats()) is not None


def test_parse_steps() -> None:
    assert parse_steps("10,50,100") == [10, 50, 100]
    assert parse_steps("25") == [25]
    for bad, why in [("", "1..100"), ("0,50", "1..100"), ("50,10", "increase"), ("x", "integers")]:
        with pytest.raises(ValueError, match=why):
            parse_steps(bad)


def test_qualify_and_split_provider() -> None:
    assert qualify("sf") == "sf@file"
    assert qualify("sf@docker") == "sf@docker"
    assert split_provider("sf-candidate@docker") == ("sf-candidate", "docker")
    assert split_provider("sf") == ("sf", None)


# -- the weights file -------------------------------------------------------------------------
def write(tmp_path: Path, text: str, name: str = "weights.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TWO = """\
# operator's note: keep me
http:
  routers:
    other: {{rule: "Host(`x`)", service: sf-weighted}}
  services:
    sf-weighted:
      weighted:
        services:
          - name: {a}
            weight: 100   # stable
          - name: {b}
            weight: "0"
        sticky: {{cookie: {{name: sf-aff}}}}
"""


@pytest.mark.parametrize(
    ("a", "b", "stable", "candidate"),
    [
        ("sf", "sf-candidate", "sf", "sf-candidate"),
        ("sf-candidate", "sf", "sf", "sf-candidate"),
        ("sf@docker", "sf-candidate@docker", "sf@docker", "sf-candidate@docker"),
        ("api-candidate@file", "api@file", "api@file", "api-candidate@file"),
    ],
)
def test_candidate_is_the_child_ending_in_candidate(
    tmp_path: Path, a: str, b: str, stable: str, candidate: str
) -> None:
    wf = WeightsFile.load(write(tmp_path, TWO.format(a=a, b=b)))
    assert (wf.service, wf.stable, wf.candidate) == ("sf-weighted", stable, candidate)


def test_explicit_roles_win_over_the_suffix(tmp_path: Path) -> None:
    path = write(tmp_path, TWO.format(a="blue", b="green"))
    with pytest.raises(WeightsError, match="neither end"):
        WeightsFile.load(path)
    wf = WeightsFile.load(path, stable="green", candidate="blue")
    assert (wf.stable, wf.candidate, wf.weights) == ("green", "blue", {"green": 0, "blue": 100})
    assert WeightsFile.load(path, candidate="green").stable == "blue"
    assert WeightsFile.load(path, stable="blue").candidate == "green"
    with pytest.raises(WeightsError, match="both end"):
        WeightsFile.load(write(tmp_path, TWO.format(a="a-candidate", b="b-candidate")))


def test_rewrite_changes_only_the_weights_and_keeps_comments(tmp_path: Path) -> None:
    path = write(tmp_path, TWO.format(a="sf", b="sf-candidate"))
    before = path.read_text()
    os.chmod(path, 0o640)
    wf = WeightsFile.load(path)
    after = wf.write({"sf": 90, "sf-candidate": 10})
    assert after.weights == {"sf": 90, "sf-candidate": 10}
    text = path.read_text()
    assert text == before.replace("weight: 100", "weight: 90").replace('weight: "0"', "weight: 10")
    assert "# operator's note: keep me" in text
    assert "# stable" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["weights.yaml"]  # no temporary file left


def test_reference_weights_file_rewrites_cleanly(tmp_path: Path) -> None:
    path = write(tmp_path, REFERENCE_WEIGHTS.read_text())
    wf = WeightsFile.load(path)
    assert (wf.stable, wf.candidate, wf.weights) == (
        "sf",
        "sf-candidate",
        {"sf": 100, "sf-candidate": 0},
    )
    wf.write({"sf": 50, "sf-candidate": 50})
    doc = yaml.safe_load(path.read_text())
    expected = yaml.safe_load(REFERENCE_WEIGHTS.read_text())
    for child in expected["http"]["services"]["sf-weighted"]["weighted"]["services"]:
        child["weight"] = 50
    assert doc == expected


def test_rewrite_is_atomic_when_the_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: os.replace fails; the file keeps its old bytes, no temporary is left."""
    path = write(tmp_path, TWO.format(a="sf", b="sf-candidate"))
    before = path.read_bytes()
    wf = WeightsFile.load(path)
    replaced: list[tuple[str, str]] = []

    def failing_replace(src: str, dst: str) -> None:
        replaced.append((src, str(dst)))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        wf.write({"sf": 0, "sf-candidate": 100})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["weights.yaml"]
    # The temporary was in the same directory (so the rename is atomic) and not a .yaml file
    # (so Traefik's directory watch never loads it).
    src, dst = replaced[0]
    assert Path(src).parent == tmp_path
    assert Path(src).name.startswith(".weights.yaml.")
    assert not src.endswith((".yaml", ".yml", ".toml"))
    assert dst == str(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("http: [unclosed\n", "not valid YAML"),
        ("http:\n  services:\n    sf: {loadBalancer: {servers: []}}\n", "no weighted service"),
        (
            "http:\n  services:\n    a: {weighted: {services: []}}\n"
            "    b: {weighted: {services: []}}\n",
            "2 weighted services \\(a, b\\); name one with --service",
        ),
        (
            "http:\n  services:\n    w:\n      weighted:\n        services:\n"
            "          - {name: a, weight: 1}\n          - {name: b-candidate, weight: 0}\n"
            "          - {name: c, weight: 0}\n",
            "must list exactly two services",
        ),
        (
            "http:\n  services:\n    w:\n      weighted:\n        services:\n"
            "          - {name: a}\n          - {name: b-candidate, weight: 0}\n",
            "child 'a' has no weight; write it out",
        ),
        (
            "http:\n  services:\n    w:\n      weighted:\n        services:\n"
            "          - {name: a, weight: -1}\n          - {name: b-candidate, weight: 0}\n",
            "weights are integers >= 0",
        ),
    ],
)
def test_malformed_weights_files_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(WeightsError, match=problem):
        WeightsFile.load(write(tmp_path, text))


# -- the command line, without Traefik ---------------------------------------------------------
def test_cli_refuses_a_malformed_weights_file_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "http:\n  services:\n    sf-weighted: {weighted: {services: [\n")
    before = path.read_bytes()
    code = main(["rollout", "--weights", str(path), "--traefik", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"rollout: refused: {path}: not valid YAML" in err
    assert path.read_bytes() == before
    assert main(["rollout", "--weights", str(path), "--abort"]) == 2
    assert path.read_bytes() == before


def test_cli_refuses_an_unknown_service_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, REFERENCE_WEIGHTS.read_text())
    before = path.read_bytes()
    code = main(["rollout", "--weights", str(path), "--candidate", "sf-next", "--abort", "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "--candidate 'sf-next' is not a child of weighted service 'sf-weighted'" in err
    assert "its children are 'sf' and 'sf-candidate'" in err
    assert json.loads(out)["result"] == "refused"
    assert path.read_bytes() == before
    code = main(["rollout", "--weights", str(path), "--service", "nope", "--abort"])
    assert code == 2
    assert "no weighted service 'nope'; the file has sf-weighted" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_cli_abort_restores_stable_100(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        REFERENCE_WEIGHTS.read_text()
        .replace("weight: 100", "weight: 50")
        .replace("weight: 0", "weight: 50"),
    )
    assert main(["rollout", "--weights", str(path), "--abort", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["result"] == "aborted"
    assert report["weights_before"] == {"sf": 50, "sf-candidate": 50}
    assert report["weights_after"] == {"sf": 100, "sf-candidate": 0}
    assert path.read_text() == REFERENCE_WEIGHTS.read_text()


def test_cli_dry_run_prints_the_plan_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, REFERENCE_WEIGHTS.read_text())
    before = path.read_bytes()
    code = main(
        ["rollout", "--weights", str(path), "--steps", "10,50", "--hold", "1m30s", "--dry-run"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "stable         sf   candidate sf-candidate   now {'sf': 100, 'sf-candidate': 0}" in out
    assert "candidate 10% -> 50% -> 100%, hold 90.00s each" in out
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--hold", "soon"], "--hold: not a duration: 'soon'"),
        (["--steps", "50,10"], "steps must increase"),
        (["--max-error-rate", "2"], "--max-error-rate 2.0: expected 0 <= rate < 1"),
        ([], "--traefik URL is required"),
    ],
)
def test_cli_bad_arguments_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], problem: str
) -> None:
    path = write(tmp_path, REFERENCE_WEIGHTS.read_text())
    before = path.read_bytes()
    assert main(["rollout", "--weights", str(path), *args]) == 2
    assert problem in capsys.readouterr().err
    assert path.read_bytes() == before


def test_cli_refuses_when_traefik_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, REFERENCE_WEIGHTS.read_text())
    before = path.read_bytes()
    code = main(["rollout", "--weights", str(path), "--traefik", "http://127.0.0.1:9"])
    assert code == 2
    assert "cannot reach Traefik's API at http://127.0.0.1:9" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_cli_report_without_plotly_refuses_before_changing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--report` needs the `report` extra: without plotly the rollout refuses (exit 2) and
    says how to install it, before touching the weights or Traefik."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "plotly" else real(name, *a)
    )
    path = write(tmp_path, REFERENCE_WEIGHTS.read_text())
    before = path.read_bytes()
    report = tmp_path / "report.html"
    args = ["--traefik", "http://127.0.0.1:9", "--report", str(report)]
    code = main(["rollout", "--weights", str(path), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert f"rollout: refused: --report {report}: the report needs plotly" in err
    assert "pip install 'sf-lifecycle[report]'" in err
    assert path.read_bytes() == before
    assert not report.exists()
