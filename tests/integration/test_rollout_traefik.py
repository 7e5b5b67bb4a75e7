"""`sf-lifecycle rollout` against real Traefik and real replicas, under load.

One Traefik (blue/green routing of `infra/traefik/dynamic/`, metrics on its internal entrypoint)
and one stable replica serve the whole module; each test starts its own candidate on the
candidate pool's port and resets the weights to stable 100 first. The rollout runs as a real
`python -m sf_lifecycle rollout` process.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sf_lifecycle._prometheus import ServiceStats, service_stats
from sf_lifecycle.testing import BlueGreenProxy, ServerProcess, free_port
from sf_lifecycle.testing.process import reap

from ._loop import BackgroundLoop

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUICK_STOP = {"SF_DRAIN_DELAY_MS": "100"}
RATE_PER_S = 40.0
STABLE_100 = {"sf": 100, "sf-candidate": 0}
#: What the first step (10 %) writes.
STEP_1 = {"sf": 90, "sf-candidate": 10}


@dataclass
class Sent:
    at: float
    status: int | None
    replica: str | None


class Load(BackgroundLoop):
    """GETs of /api/hello through the proxy at a fixed rate; every other one from a client
    that keeps the `sf-aff` cookie Traefik gave it."""

    name = "load"

    def __init__(self, proxy: BlueGreenProxy) -> None:
        self.proxy = proxy
        self.cookie = ""
        self.sent: list[Sent] = []
        super().__init__()

    def _run(self) -> None:
        n, next_at = 0, time.monotonic()
        while not self._stop.is_set():
            sticky = n % 2 == 1
            headers = {"Cookie": self.cookie} if sticky and self.cookie else {}
            at = time.monotonic()
            try:
                status, h, _ = self.proxy.request("/api/hello", headers=headers, timeout=5.0)
            except (OSError, http.client.HTTPException):
                self.sent.append(Sent(at, None, None))
            else:
                cookie = self.proxy.sticky_cookie(h)
                if sticky and cookie:
                    self.cookie = cookie
                self.sent.append(Sent(at, status, h.get("x-sf-replica")))
            n += 1
            next_at += 1 / RATE_PER_S
            self._stop.wait(max(0.0, next_at - time.monotonic()))


class WeightsWatch(BackgroundLoop):
    """Polls the weights file; records when each new set of weights appeared."""

    name = "weights"
    join_s = 5.0

    def __init__(self, proxy: BlueGreenProxy) -> None:
        self.proxy = proxy
        self.changes: list[tuple[float, dict[str, int]]] = []
        super().__init__()

    def __enter__(self) -> WeightsWatch:
        self.changes.append((time.monotonic(), self.proxy.file_weights()))
        return super().__enter__()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            w = self.proxy.file_weights()
            if w != self.changes[-1][1]:
                self.changes.append((time.monotonic(), w))


@pytest.fixture(scope="module")
def stable() -> Iterator[ServerProcess]:
    with ServerProcess(env={**QUICK_STOP, "SF_REPLICA_ID": "stable"}, cwd=ROOT) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def candidate_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def proxy(stable: ServerProcess, candidate_port: int) -> Iterator[BlueGreenProxy]:
    with BlueGreenProxy(stable.url, f"http://127.0.0.1:{candidate_port}") as p:
        yield p


@pytest.fixture
def fresh(proxy: BlueGreenProxy) -> BlueGreenProxy:
    proxy.set_weights(100, 0)
    return proxy


def start_candidate(proxy: BlueGreenProxy, port: int, **env: str) -> ServerProcess:
    cand = ServerProcess(
        env={**QUICK_STOP, "SF_REPLICA_ID": "candidate", **env}, port=port, cwd=ROOT
    )
    cand.start()
    cand.wait_ready()
    proxy._poll(
        lambda: set(proxy.candidate_status().values()) == {"UP"},
        time.monotonic() + 10,
        "candidate UP in Traefik",
    )
    proxy._poll(  # the verification router's own service, probed apart
        lambda: set(proxy.verify_status().values()) == {"UP"},
        time.monotonic() + 10,
        "candidate UP behind the verification router",
    )
    return cand


def rollout_cmd(proxy: BlueGreenProxy, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sf_lifecycle",
        "rollout",
        "--weights",
        str(proxy.weights_path),
        "--traefik",
        proxy.api_url,
        *args,
    ]


@contextlib.contextmanager
def rollout_at_step_1(
    proxy: BlueGreenProxy, *args: str, stderr: int = subprocess.DEVNULL
) -> Iterator[subprocess.Popen[str]]:
    """`rollout ARGS` running, once Traefik serves its first step; reaped by PID on the way out."""
    proc = subprocess.Popen(
        rollout_cmd(proxy, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    try:
        proxy._poll(lambda: proxy.served_weights() == STEP_1, time.monotonic() + 15, "step 1")
        yield proc
    finally:
        reap(proc, 5)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def run_rollout(proxy: BlueGreenProxy, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        rollout_cmd(proxy, *args),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        reap(proc, 5)
    return proc.returncode, out, err


def report_data(path: Path) -> dict[str, Any]:
    """The data embedded in an upgrade report, beside its chart."""
    text = path.read_text()
    m = re.search(r'<script type="application/json" id="sf-report-data">(.*?)</script>', text)
    assert m is not None, f"no data in {path}"
    data: dict[str, Any] = json.loads(m.group(1))
    return data


def test_good_candidate_is_promoted_step_by_step(
    fresh: BlueGreenProxy, candidate_port: int, tmp_path: Path
) -> None:
    """Steps:

    1. A good candidate, UP in Traefik at weight 0; 40 requests/s through the proxy.
    2. `rollout --steps 10,50,100 --hold 1500ms --json --report FILE`.
    3. Assert: exit 0; three steps, each passed with candidate traffic measured from Traefik's
       metrics; the file and Traefik both say candidate 100; no request failed; once promoted,
       every request (also the sticky client's) reaches the candidate. The report holds the
       weights Traefik served at each step, in the JSON summary too, and both services'
       requests with no failure.
    """
    with start_candidate(fresh, candidate_port) as cand, Load(fresh) as load:
        time.sleep(0.5)
        code, out, err = run_rollout(
            fresh,
            *("--steps", "10,50,100", "--hold", "1500ms", "--interval", "250ms"),
            *("--min-requests", "3", "--candidate-ready", f"{cand.url}/api/ready", "--json"),
            *("--report", str(tmp_path / "rollout.html")),
        )
        promoted_at = time.monotonic()
        time.sleep(1.0)
    assert code == 0, err
    report = json.loads(out)
    assert report["result"] == "promoted"
    assert [s["weight"] for s in report["steps"]] == [10, 50, 100]
    assert [s["verdict"] for s in report["steps"]] == ["ok", "ok", "ok"]
    assert all(s["candidate"]["requests"] >= 3 for s in report["steps"]), report["steps"]
    assert all(s["candidate"]["errors"] == 0 for s in report["steps"])
    assert report["steps"][0]["stable"]["requests"] > report["steps"][0]["candidate"]["requests"]
    assert report["weights_after"] == {"sf": 0, "sf-candidate": 100}
    assert fresh.file_weights() == {"sf": 0, "sf-candidate": 100}
    assert fresh.served_weights() == {"sf": 0, "sf-candidate": 100}
    assert [ln.split()[1] for ln in err.splitlines() if ln.startswith("step ")] == [
        "1/3",
        "2/3",
        "3/3",
    ]
    failed = [s for s in load.sent if s.status != 200]
    assert failed == []
    assert {s.replica for s in load.sent if s.at > promoted_at} == {"candidate"}
    served = [(w["note"], w["weights"]["sf-candidate"]) for w in report["weights_timeline"]]
    assert served == [("start", 0), ("step 10%", 10), ("step 50%", 50), ("step 100%", 100)]
    assert f"report: {tmp_path / 'rollout.html'}" in err
    data = report_data(tmp_path / "rollout.html")
    assert [w["weights"] for w in data["weights"]] == [
        w["weights"] for w in report["weights_timeline"]
    ]
    assert sum(data["requests"]["sf-candidate"]) >= sum(
        s["candidate"]["requests"] for s in report["steps"]
    )
    assert sum(data["requests"]["sf"]) > 0
    assert data["failures"] == []
    assert data["verdict"] == "rollout promoted"


def test_bad_candidate_is_rolled_back_within_one_hold(
    fresh: BlueGreenProxy, candidate_port: int, tmp_path: Path
) -> None:
    """Steps:

    1. A candidate that answers 500 to half of /api/hello (SF_EXAMPLE_FAIL_RATE=0.5), UP in
       Traefik (its health check cannot see the fault); 40 requests/s; the weights file watched.
    2. `rollout --steps 10,50,100 --hold 3s --max-error-rate 0.01 --min-requests 10 --report`.
    3. Assert: exit 1 with the breach reported; the file and Traefik are back at stable 100;
       the rollback was written within one hold of the first error a client saw; every error
       came from the candidate, after its weight was raised and before the rollback was loaded;
       afterwards every request, the sticky client's too, reaches the stable and succeeds. The
       report shows the candidate's 5xx as failures and the weights back at stable 100.
    """
    hold_s = 3.0
    with (
        start_candidate(fresh, candidate_port, SF_EXAMPLE_FAIL_RATE="0.5"),
        WeightsWatch(fresh) as watch,
        Load(fresh) as load,
    ):
        code, out, err = run_rollout(
            fresh,
            *("--steps", "10,50,100", "--hold", f"{hold_s}s", "--interval", "250ms"),
            *("--max-error-rate", "0.01", "--min-requests", "10", "--json"),
            *("--report", str(tmp_path / "rollback.html")),
        )
        rolled_back = time.monotonic()
        time.sleep(1.5)
    assert code == 1, err
    report = json.loads(out)
    assert report["result"] == "rolled_back"
    assert len(report["steps"]) == 1
    step = report["steps"][0]
    assert (step["weight"], step["verdict"]) == (10, "breach")
    # Judged during the hold, or at its end when the candidate had not yet served
    # --min-requests (a loaded machine): never held past it.
    assert step["held_s"] <= hold_s + 0.25
    assert "candidate answered 5xx" in report["reason"]
    assert step["candidate"]["errors"] >= 1
    assert "ROLLBACK: candidate answered 5xx" in err
    assert fresh.file_weights() == STABLE_100
    assert fresh.served_weights() == STABLE_100
    assert [w for _, w in watch.changes] == [
        STABLE_100,
        {"sf": 90, "sf-candidate": 10},
        STABLE_100,
    ]
    raised_at, rollback_at = watch.changes[1][0], watch.changes[2][0]
    errors = [s for s in load.sent if s.status != 200]
    assert errors, "the bad candidate should have failed some requests"
    assert {(s.status, s.replica) for s in errors} == {(500, "candidate")}
    assert rollback_at - errors[0].at <= hold_s
    # Errors only while the candidate had weight (a reload takes ~0.1 s, in flight a bit more).
    assert all(raised_at <= s.at <= rollback_at + 0.5 for s in errors), (raised_at, rollback_at)
    after = [s for s in load.sent if s.at > rolled_back + 0.5]
    assert len(after) >= 20
    assert {(s.status, s.replica) for s in after} == {(200, "stable")}
    data = report_data(tmp_path / "rollback.html")
    assert [w["note"] for w in data["weights"]] == ["start", "step 10%", "rollback"]
    assert data["weights"][-1]["weights"] == STABLE_100
    assert sum(f["failed"] for f in data["failures"]) >= step["candidate"]["errors"]
    assert {k for f in data["failures"] for k in f["what"]} == {"HTTP 5xx (sf-candidate)"}
    assert data["verdict"] == "rollout rolled_back"


def test_candidate_not_ready_is_refused(fresh: BlueGreenProxy, candidate_port: int) -> None:
    """Steps:

    1. No candidate running: Traefik marks its pool DOWN. `rollout` refuses: exit 2, message
       naming the candidate's status, weights file byte for byte unchanged.
    2. A candidate UP in Traefik but `--candidate-ready` answering 404: refused the same way.
    """
    fresh._poll(
        lambda: set(fresh.candidate_status().values()) == {"DOWN"},
        time.monotonic() + 6,
        "candidate DOWN",
    )
    before = fresh.weights_path.read_bytes()
    code, _, err = run_rollout(fresh, "--hold", "1s")
    assert code == 2
    assert "does not report the candidate sf-candidate@file UP" in err
    assert f"'http://127.0.0.1:{candidate_port}': 'DOWN'" in err
    assert fresh.weights_path.read_bytes() == before
    with start_candidate(fresh, candidate_port) as cand:
        code, _, err = run_rollout(fresh, "--candidate-ready", f"{cand.url}/api/nope")
    assert code == 2
    assert f"candidate not ready: {cand.url}/api/nope answered 404, not 200" in err
    assert fresh.weights_path.read_bytes() == before
    assert fresh.served_weights() == STABLE_100


def test_killed_mid_step_keeps_the_last_weights_until_abort(
    fresh: BlueGreenProxy, candidate_port: int
) -> None:
    """Steps:

    1. A good candidate; `rollout --hold 30s` in the background; wait until Traefik serves
       the first step (candidate 10).
    2. SIGKILL the rollout process (nothing can be caught).
    3. Assert: the file and Traefik still hold sf 90 / candidate 10, the last weights written.
    4. `rollout --abort`: exit 0; file and Traefik at stable 100; requests reach the stable only.
    """
    with start_candidate(fresh, candidate_port):
        with rollout_at_step_1(fresh, "--steps", "10,50,100", "--hold", "30s") as proc:
            time.sleep(0.5)  # mid-hold
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(5) == -signal.SIGKILL
        assert fresh.file_weights() == STEP_1
        time.sleep(0.3)
        assert fresh.served_weights() == STEP_1

        before = time.monotonic()
        code, out, err = run_rollout(fresh, "--abort")
        assert code == 0, err
        assert "aborted" in out
        assert fresh.file_weights() == STABLE_100
        fresh._poll(lambda: fresh.served_weights() == STABLE_100, before + 5, "abort loaded")
        replicas = {fresh.request("/api/hello")[1].get("x-sf-replica") for _ in range(20)}
        assert replicas == {"stable"}


def test_unknown_service_and_malformed_file_change_nothing(fresh: BlueGreenProxy) -> None:
    """The real command against the live weights file: an unknown `--candidate` and a file that
    is not a weights file are refused with exit 2 and a message naming the problem; the live
    file and Traefik's weights stay as they were."""
    before = fresh.weights_path.read_bytes()
    code, _, err = run_rollout(fresh, "--candidate", "sf-next")
    assert code == 2
    assert "--candidate 'sf-next' is not a child of weighted service 'sf-weighted'" in err
    code, _, err = run_rollout(fresh, "--service", "sf-other", "--dry-run")
    assert code == 2
    assert "no weighted service 'sf-other'" in err
    routing = fresh.dynamic_path  # the routing file: pools and routers, no weighted service
    proc = subprocess.run(
        [*rollout_cmd(fresh)[:4], "--weights", str(routing), "--traefik", fresh.api_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert f"{routing}: no weighted service (http.services.<name>.weighted)" in proc.stderr
    assert fresh.weights_path.read_bytes() == before
    assert fresh.served_weights() == STABLE_100


def test_sigterm_mid_step_rolls_back(fresh: BlueGreenProxy, candidate_port: int) -> None:
    """Steps: a good candidate; `rollout --hold 30s`; once Traefik serves step 1, SIGTERM the
    command. Assert: exit 130, `interrupted` reported, stable 100 in the file and in Traefik."""
    with (
        start_candidate(fresh, candidate_port),
        rollout_at_step_1(fresh, "--hold", "30s", "--json") as proc,
    ):
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 130
    report = json.loads(out)
    assert report["result"] == "interrupted"
    assert report["weights_after"] == STABLE_100
    assert fresh.file_weights() == STABLE_100
    assert fresh.served_weights() == STABLE_100


def _service_requests(proxy: BlueGreenProxy, service: str) -> float:
    return service_stats(proxy.metrics_text()).get(service, ServiceStats()).requests


def test_verification_requests_stay_out_of_the_weighted_childs_metrics(
    fresh: BlueGreenProxy, candidate_port: int
) -> None:
    """Steps: a candidate at weight 0; 20 requests through its verification router (Host
    candidate.sf.localhost). Assert: all 200 from the candidate; Traefik's counters of the
    weighted child `sf-candidate@file`, which the rollout judges, did not move; those of the
    verification service `sf-candidate-verify@file` grew by exactly 20."""
    with start_candidate(fresh, candidate_port):
        child = _service_requests(fresh, "sf-candidate@file")
        verify = _service_requests(fresh, "sf-candidate-verify@file")
        answers = [fresh.candidate_request("/api/hello") for _ in range(20)]
        assert {(s, h.get("x-sf-replica")) for s, h, _ in answers} == {(200, "candidate")}
        time.sleep(0.2)
        assert _service_requests(fresh, "sf-candidate@file") == child
        assert _service_requests(fresh, "sf-candidate-verify@file") == verify + 20


def test_a_candidate_whose_requests_hang_fails_its_step(
    fresh: BlueGreenProxy, candidate_port: int
) -> None:
    """Steps:

    1. A candidate whose /api/hello hangs 8 s on every second request (inside the lifecycle
       middleware, as an application's own hang would); Traefik's health check cannot see it.
    2. 30 requests/s, each on its own connection, none waiting on another.
    3. `rollout --steps 10,50,100 --hold 3s --min-requests 3`: no hanging request ends within
       the hold, so Traefik's counters alone show a clean candidate.
    4. Assert: exit 1 at step 1, the reason names the requests still running past the latency
       limit; stable 100 in the file and in Traefik.
    """
    env = {
        "SF_TEST_HANG_RATE": "0.5",
        "SF_TEST_HANG_S": "8",
        "SF_RPC_SHUTDOWN_GRACE_MS": "1000",
    }
    cand = ServerProcess(
        "tests.integration.hanging_app:app",
        env={**QUICK_STOP, "SF_REPLICA_ID": "candidate", **env},
        port=candidate_port,
        cwd=ROOT,
    )
    cand.start()
    stop = threading.Event()

    def one() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            fresh.request("/api/hello", timeout=10.0)

    def load(pool: ThreadPoolExecutor) -> None:
        while not stop.wait(1 / 30):
            pool.submit(one)

    try:
        cand.wait_ready()
        fresh._poll(
            lambda: set(fresh.candidate_status().values()) == {"UP"},
            time.monotonic() + 10,
            "candidate UP in Traefik",
        )
        with ThreadPoolExecutor(max_workers=64) as pool:
            loader = threading.Thread(target=load, args=(pool,), daemon=True)
            loader.start()
            try:
                code, out, err = run_rollout(
                    fresh,
                    *("--steps", "10,50,100", "--hold", "3s", "--interval", "250ms"),
                    *("--min-requests", "3", "--json"),
                )
            finally:
                stop.set()
                loader.join(5)
    finally:
        cand.close()
    assert code == 1, err
    report = json.loads(out)
    assert report["result"] == "rolled_back"
    assert [s["weight"] for s in report["steps"]] == [10]
    assert "of the candidate's requests still running after more than" in report["reason"]
    assert fresh.file_weights() == STABLE_100
    assert fresh.served_weights() == STABLE_100


def test_metrics_without_service_labels_are_refused(
    stable: ServerProcess, candidate_port: int
) -> None:
    """Steps: a second Traefik with Prometheus metrics on but `addServicesLabels: false` (no
    per-service series at all), a good candidate UP. Assert: `rollout` refuses (exit 2) naming
    the missing series, and the weights file is byte for byte unchanged."""

    class Unlabelled(BlueGreenProxy):
        def static_config(self) -> dict[str, Any]:
            cfg = super().static_config()
            cfg["metrics"]["prometheus"]["addServicesLabels"] = False
            return cfg

    with Unlabelled(stable.url, f"http://127.0.0.1:{candidate_port}") as proxy:
        with start_candidate(proxy, candidate_port):
            before = proxy.weights_path.read_bytes()
            code, _, err = run_rollout(proxy, "--hold", "1s", "--min-requests", "0")
            assert 'service="' not in proxy.metrics_text()
        assert code == 2, err
        assert "have no series labelled with service sf@file or sf-candidate@file" in err
        assert "addServicesLabels" in err
        assert proxy.weights_path.read_bytes() == before


def test_abort_wins_over_a_running_rollout(fresh: BlueGreenProxy, candidate_port: int) -> None:
    """Steps:

    1. A good candidate; `rollout --hold 30s` running; Traefik serves step 1 (candidate 10).
    2. A second `rollout` on the same file is refused: exit 2, another rollout holds the lock.
    3. `rollout --abort` meanwhile: exit 0, without waiting for the 30 s hold.
    4. Assert: the running rollout notices within its interval, stops without writing (exit 1,
       `stopped`); stable 100 in the file and in Traefik.
    """
    with (
        start_candidate(fresh, candidate_port),
        rollout_at_step_1(
            fresh, "--hold", "30s", "--interval", "250ms", "--json", stderr=subprocess.PIPE
        ) as proc,
    ):
        code, _, err = run_rollout(fresh, "--hold", "1s")
        assert code == 2
        assert "another rollout is running on" in err
        started = time.monotonic()
        code, out, err = run_rollout(fresh, "--abort")
        assert code == 0, err
        assert "aborted" in out
        out, err = proc.communicate(timeout=10)
        assert time.monotonic() - started < 10
    assert proc.returncode == 1, err
    report = json.loads(out)
    assert report["result"] == "stopped"
    assert "changed underneath the rollout" in report["reason"]
    assert fresh.file_weights() == STABLE_100
    fresh._poll(lambda: fresh.served_weights() == STABLE_100, time.monotonic() + 5, "abort")


def test_a_second_signal_during_the_rollback_is_ignored(
    fresh: BlueGreenProxy, candidate_port: int
) -> None:
    """Steps: a good candidate; `rollout --hold 30s --json`; once Traefik serves step 1, SIGINT
    and SIGTERM back to back (an impatient operator). Assert: exit 130, one JSON report
    `interrupted`, no traceback, stable 100 in the file and in Traefik."""
    with (
        start_candidate(fresh, candidate_port),
        rollout_at_step_1(fresh, "--hold", "30s", "--json", stderr=subprocess.PIPE) as proc,
    ):
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    report = json.loads(out)
    assert report["result"] == "interrupted"
    assert report["weights_after"] == STABLE_100
    assert fresh.file_weights() == STABLE_100
    assert fresh.served_weights() == STABLE_100


def test_sigint_during_preflight_exits_130_with_a_report(
    fresh: BlueGreenProxy, candidate_port: int
) -> None:
    """Steps: a candidate whose readiness URL takes 3 s to answer (its /api/slow); SIGINT while
    pre-flight waits for it. Assert: exit 130, JSON `interrupted`, no traceback, the weights
    file byte for byte unchanged."""
    with start_candidate(fresh, candidate_port) as cand:
        before = fresh.weights_path.read_bytes()
        proc = subprocess.Popen(
            rollout_cmd(fresh, "--candidate-ready", f"{cand.url}/api/slow?seconds=3", "--json"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.5)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
        finally:
            reap(proc, 5)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    report = json.loads(out)
    assert report["result"] == "interrupted"
    assert report["weights_after"] == STABLE_100
    assert fresh.weights_path.read_bytes() == before
