"""`sf-lifecycle rollout` in process: metrics parser, weights file, roles, gate, CLI errors."""

from __future__ import annotations

import fcntl
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from sf_lifecycle._cli import main
from sf_lifecycle._gate import Gate
from sf_lifecycle._prometheus import (
    ServiceStats,
    histogram_quantile,
    parse_samples,
    service_stats,
)
from sf_lifecycle._rollout_cli import parse_steps
from sf_lifecycle._traefik_api import health_check_path, qualify
from sf_lifecycle._weights import WeightsError, WeightsFile, split_provider

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


# -- review of issue 12: regressions ------------------------------------------------------------
def test_a_counter_reset_never_hides_errors_and_never_goes_negative() -> None:
    """Traefik restarted between two scrapes: every counter restarts at 0. The window is then the
    whole new scrape, for all counters together (errors are not subtracted from an old count)."""
    before = ServiceStats(100, 50, {0.1: 100, math.inf: 100})
    restarted = ServiceStats(60, 55, {0.1: 5, math.inf: 60})
    d = restarted.since(before)
    assert (d.requests, d.errors, d.buckets) == (60, 55, {0.1: 5, math.inf: 60})
    for now in (restarted, ServiceStats(), ServiceStats(101, 0, {0.1: 101, math.inf: 101})):
        d = now.since(before)
        assert d.requests >= 0
        assert d.errors >= 0
        assert all(v >= 0 for v in d.buckets.values())


def test_a_traefik_restart_is_seen_by_its_start_time() -> None:
    """A restart whose counters already passed their old values: only Traefik's start time
    (`process_start_time_seconds`) tells; the window is then everything since the restart."""
    from sf_lifecycle._prometheus import process_start
    from sf_lifecycle._traefik_api import Scrape

    old = Scrape(1000.0, {"c@file": ServiceStats(100, 0, {math.inf: 100})})
    new = Scrape(2000.0, {"c@file": ServiceStats(150, 40, {math.inf: 150})})
    assert new.since("c@file", old).requests == 150
    assert new.since("c@file", old).errors == 40
    same = Scrape(1000.0, {"c@file": ServiceStats(150, 40, {math.inf: 150})})
    assert same.since("c@file", old).requests == 50
    assert process_start(SCRAPE) == 1.7e9


def test_requests_still_running_count_against_the_candidate() -> None:
    """Traefik only counts finished requests; the candidate's requests still running after the
    latency limit are a breach when more than 1 % of its requests hang."""
    gate = Gate(max_error_rate=0.01, max_latency_ratio=2.0, latency_floor_s=0.1, min_requests=5)
    stable = ServiceStats(1000, 0, {0.01: 1000, math.inf: 1000})
    fast = ServiceStats(200, 0, {0.01: 200, math.inf: 200})
    assert gate.end_of_hold(fast, stable) is None
    reason = gate.end_of_hold(fast, stable, hanging=3, hang_limit_s=0.1)
    assert reason is not None
    assert reason.startswith("3 of the candidate's requests still running after more than 100ms")
    # Only hanging requests and nothing finished: still a breach, not "not enough traffic".
    reason = gate.end_of_hold(ServiceStats(), stable, hanging=2, hang_limit_s=0.1)
    assert reason is not None
    assert "still running" in reason
    # 1 in 1000 is within p99.
    many = ServiceStats(999, 0, {0.01: 999, math.inf: 999})
    assert gate.end_of_hold(many, stable, hanging=1, hang_limit_s=0.1) is None


def test_service_series_without_traffic_still_show_per_service_labels() -> None:
    """The pools' health checks give `traefik_service_server_up{service=...}` before any
    traffic: pre-flight takes any per-service series as proof of addServicesLabels."""
    stats = service_stats(
        'traefik_service_server_up{service="sf-candidate@file",url="http://x"} 1\n'
        'traefik_open_connections{entrypoint="web",protocol="TCP"} 5\n'
    )
    assert set(stats) == {"sf-candidate@file"}
    assert stats["sf-candidate@file"].requests == 0


def test_owner_and_group_are_kept_by_the_rewrite(tmp_path: Path) -> None:
    """Run as root against a file owned by Traefik's user: the rewritten file keeps uid/gid (and
    mode), so Traefik can still read it."""
    path = write(tmp_path, TWO.format(a="sf", b="sf-candidate"))
    os.chmod(path, 0o640)
    uid, gid = (12345, 12346) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(path, uid, gid)
    WeightsFile.load(path).write({"sf": 90, "sf-candidate": 10})
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o640)
    assert WeightsFile.load(path).weights == {"sf": 90, "sf-candidate": 10}


def test_an_owner_that_cannot_be_kept_refuses_before_writing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Steps: a file owned by uid 12345 in a world-writable directory; `--abort` run with the
    effective uid of another unprivileged user (nobody), who could replace the file but not keep
    its owner. Assert: exit 2, a clear message, the file's bytes and owner unchanged, no
    temporary file left."""
    assert os.geteuid() == 0, "this test needs root to create a file owned by another user"
    with tempfile.TemporaryDirectory(prefix="sf-owner-", dir="/tmp") as tmp:
        d = Path(tmp)
        os.chmod(d, 0o777)
        path = write(d, REFERENCE_WEIGHTS.read_text().replace("weight: 0", "weight: 10"))
        os.chmod(path, 0o666)
        os.chown(path, 12345, 12345)
        before = path.read_bytes()
        os.setegid(65534)
        os.seteuid(65534)
        try:
            code = main(["rollout", "--weights", str(path), "--abort"])
        finally:
            os.seteuid(0)
            os.setegid(0)
        err = capsys.readouterr().err
        assert code == 2
        assert "cannot keep its owner 12345:12345 on the rewritten file" in err
        assert path.read_bytes() == before
        assert path.stat().st_uid == 12345
        assert [p.name for p in d.iterdir()] == ["weights.yaml"]


HEAD = "http:\n  services:\n    sf-weighted:\n      weighted:\n        services:\n"


@pytest.mark.parametrize(
    ("children", "shown"),
    [
        (
            "          - name: sf\n            weight: &w 100\n"
            "          - name: sf-candidate\n            weight: *w\n",
            "'&w 100'",
        ),
        (
            "          - name: sf\n            weight: |\n              100\n"
            "          - name: sf-candidate\n            weight: 0\n",
            "'|\\n              100'",
        ),
        (
            "          - name: sf\n            weight: !!int 90\n"
            "          - name: sf-candidate\n            weight: 10\n",
            "'!!int 90'",
        ),
        (
            "          - name: sf\n            weight: 90\n"
            "          - name: sf-candidate\n            weight: 1_0\n",
            "'1_0'",
        ),
    ],
)
def test_weights_the_rewrite_would_break_are_refused_and_abort_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], children: str, shown: str
) -> None:
    """Anchors, aliases, tags, block scalars, non-decimal numbers: the splice would produce an
    invalid or different file. Refused at once, exit 2, a message saying how to write the
    weight, the file unchanged; no traceback from the YAML scanner."""
    path = write(tmp_path, HEAD + children)
    before = path.read_bytes()
    with pytest.raises(WeightsError, match="rewrites only a plain decimal number"):
        WeightsFile.load(path)
    for args in (["--abort"], ["--traefik", "http://127.0.0.1:9"]):
        assert main(["rollout", "--weights", str(path), *args]) == 2
        err = capsys.readouterr().err
        assert f"has weight written as {shown}" in err
        assert path.read_bytes() == before


def test_abort_dry_run_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        HEAD + "          - {name: sf, weight: 90}\n          - {name: sf-candidate, weight: 10}\n",
    )
    before = path.read_bytes()
    assert main(["rollout", "--weights", str(path), "--abort", "--dry-run", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["result"] == "dry_run"
    assert report["weights_after"] == {"sf": 90, "sf-candidate": 10}
    assert "would write {'sf': 100, 'sf-candidate': 0}" in err
    assert path.read_bytes() == before


def test_a_symlinked_weights_file_is_written_through(tmp_path: Path) -> None:
    """The link stays a link; its target gets the new weights (rename in the target's
    directory), so a watcher of the target sees the change."""
    real = tmp_path / "real"
    real.mkdir()
    target = write(real, REFERENCE_WEIGHTS.read_text())
    link = tmp_path / "weights.yaml"
    link.symlink_to(target)
    WeightsFile.load(link).write({"sf": 90, "sf-candidate": 10})
    assert link.is_symlink()
    assert link.resolve() == target
    assert WeightsFile.load(target).weights == {"sf": 90, "sf-candidate": 10}
    assert sorted(p.name for p in real.iterdir()) == ["weights.yaml"]


def test_crlf_line_endings_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "weights.yaml"
    path.write_bytes(REFERENCE_WEIGHTS.read_bytes().replace(b"\n", b"\r\n"))
    WeightsFile.load(path).write({"sf": 90, "sf-candidate": 10})
    data = path.read_bytes()
    assert data.count(b"\r\n") == data.count(b"\n") > 10
    assert b"weight: 90\r\n" in data


def test_a_rollout_starts_only_from_stable_100(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        REFERENCE_WEIGHTS.read_text()
        .replace("weight: 100", "weight: 90")
        .replace("weight: 0", "weight: 10"),
    )
    before = path.read_bytes()
    code = main(["rollout", "--weights", str(path), "--traefik", "http://127.0.0.1:9", "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "not sf 100 / sf-candidate 0: a rollout starts from the stable" in err
    assert "--abort` first" in err
    report = json.loads(out)
    assert report["weights_after"] == {"sf": 90, "sf-candidate": 10}  # what the file holds
    assert path.read_bytes() == before


def test_a_second_rollout_on_the_same_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another rollout holds the flock on the directory: a second is refused (exit 2); an
    `--abort` does not wait for it and writes stable 100 anyway."""
    path = write(tmp_path, REFERENCE_WEIGHTS.read_text())
    before = path.read_bytes()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(["rollout", "--weights", str(path), "--traefik", "http://127.0.0.1:9"])
        assert code == 2
        assert f"another rollout is running on {path}" in capsys.readouterr().err
        assert path.read_bytes() == before
        monkeypatch.setattr("sf_lifecycle._rollout_lock.ABORT_WAIT_S", 0.3)
        path.write_text(path.read_text().replace("weight: 100", "weight: 50"))
        assert main(["rollout", "--weights", str(path), "--abort"]) == 0
        assert WeightsFile.load(path).weights == {"sf": 100, "sf-candidate": 0}
        assert "a rollout is running" in capsys.readouterr().out
    finally:
        os.close(fd)
    assert not [p for p in tmp_path.iterdir() if p.name != "weights.yaml"]  # no lock file


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--max-latency-ratio", "nan"], "--max-latency-ratio nan: expected a finite number >= 1"),
        (["--max-latency-ratio", "inf"], "--max-latency-ratio inf: expected a finite number >= 1"),
        (["--max-latency-ratio", "0"], "--max-latency-ratio 0.0: expected a finite number >= 1"),
        (["--max-error-rate", "nan"], "--max-error-rate nan: expected 0 <= rate < 1"),
        (["--hold", "10ms"], "--hold 10ms: expected 100ms to 60m"),
        (["--hold", "1000h"], "--hold 1000h: expected 100ms to 60m"),
        (["--hold", "1s", "--interval", "5s"], "--interval 5s: expected 50ms up to --hold"),
        (["--min-requests", "-1"], "--min-requests -1: expected >= 0"),
    ],
)
def test_cli_absurd_arguments_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], problem: str
) -> None:
    path = write(tmp_path, REFERENCE_WEIGHTS.read_text())
    before = path.read_bytes()
    assert main(["rollout", "--weights", str(path), "--traefik", "http://127.0.0.1:9", *args]) == 2
    assert problem in capsys.readouterr().err
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


@pytest.mark.parametrize("where", ["the file", "a link to it", "its directory", "beside it"])
def test_cli_report_never_lands_on_the_weights_or_in_their_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """`--report` naming the weights file (or a link to it), the directory Traefik watches or
    any file in it is refused (exit 2) before anything is written: the weights stay valid and
    `--abort` still works."""
    watched = tmp_path / "dynamic"
    watched.mkdir()
    path = write(watched, REFERENCE_WEIGHTS.read_text())
    before = path.read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "report.html").symlink_to(path)
    report = {
        "the file": path,
        "a link to it": elsewhere / "report.html",
        "its directory": watched,
        "beside it": watched / "report.html",
    }[where]
    args = ["--traefik", "http://127.0.0.1:9", "--report", str(report)]
    code = main(["rollout", "--weights", str(path), *args])
    err = capsys.readouterr().err
    assert code == 2
    if where in ("the file", "a link to it"):
        assert f"rollout: refused: --report {report}: that is the weights file {path}" in err
    else:
        assert f"rollout: refused: --report {report}: in {watched}, the weights file's" in err
    assert path.read_bytes() == before
    assert sorted(p.name for p in watched.iterdir()) == ["weights.yaml"]
    assert main(["rollout", "--weights", str(path), "--abort"]) == 0


def test_cli_report_to_an_unwritable_path_is_refused_before_the_rollout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A report path that cannot be written fails at once (exit 2), naming the path and why,
    before Traefik is asked anything (port 9 would fail later, with another message)."""
    path = write(tmp_path, REFERENCE_WEIGHTS.read_text())
    before = path.read_bytes()
    out = tmp_path.parent / f"{tmp_path.name}-out"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    cases = {
        out: "is a directory (give a file name)",
        out / "notes.txt" / "r.html": f"{out / 'notes.txt'} is not a directory",
        Path("/proc/r.html"): "cannot create a file in /proc: ",
    }
    for report, why in cases.items():
        args = ["--traefik", "http://127.0.0.1:9", "--report", str(report)]
        assert main(["rollout", "--weights", str(path), *args]) == 2
        assert f"rollout: refused: --report {report}: {why}" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_cli_interrupted_before_the_first_step_writes_no_report(tmp_path: Path) -> None:
    """Ctrl-C during the pre-flight (Traefik's API accepts the connection and never answers):
    exit 130, nothing changed, and no report: the rollout never started (a report would have
    no time zero and no data)."""
    import signal
    import socket
    import subprocess
    import sys

    path = write(tmp_path, REFERENCE_WEIGHTS.read_text())
    before = path.read_bytes()
    report = tmp_path.parent / f"{tmp_path.name}-report.html"
    with socket.socket() as hang:
        hang.bind(("127.0.0.1", 0))
        hang.listen(1)
        hang.settimeout(30)
        cmd = [sys.executable, "-m", "sf_lifecycle", "rollout", "--weights", str(path)]
        cmd += ["--traefik", f"http://127.0.0.1:{hang.getsockname()[1]}"]
        proc = subprocess.Popen(
            [*cmd, "--report", str(report)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            conn, _ = hang.accept()  # the pre-flight is asking Traefik for the service
            with conn:
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted before the first step; nothing changed" in out
    assert not report.exists()
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("service", "path"),
    [
        ({"loadBalancer": {"healthCheck": {"path": "/internal/healthz"}}}, "/internal/healthz"),
        ({"loadBalancer": {"healthCheck": {"path": "/healthz", "interval": "2s"}}}, "/healthz"),
        ({"loadBalancer": {"servers": [{"url": "http://a:4000"}]}}, None),
        ({"weighted": {"services": []}}, None),
        (None, None),
    ],
)
def test_the_candidates_health_path_comes_from_traefiks_view_of_its_health_check(
    service: dict[str, Any] | None, path: str | None
) -> None:
    # `rollout` reads the candidate's requests in flight from `<prefix>/healthz`: the prefix
    # its Traefik health check polls, not a hard-coded /api.
    assert health_check_path(service) == path
