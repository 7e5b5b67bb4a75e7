"""Metrics and logs of real server processes: `sf-lifecycle serve` and plain `uvicorn`."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sf_lifecycle.testing import ServerProcess, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed by prometheus_client's own parser (which raises on a
    malformed exposition): (name, sorted labels) -> value."""
    r = httpx.get(url, timeout=5)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_after_writes_streams_and_drain_and_json_logs(tmp_path: Path) -> None:
    """Steps:
    1. serve the example with the metrics on a path and a port, JSON logs, the access log
       switched on by the flag over `SF_ACCESS_LOG=0`;
    2. three feedback writes, one of them replayed by key; two events published, a stream
       resumed after the first (it receives the second);
    3. scrape: ready, the replay, the resume, one open stream, the event sent, and (once the
       drainer ran) the three records delivered, the queue empty;
    4. SIGTERM, one health probe (503); the scrape during the drain delay says draining, one
       503 probe, a drain delay under way;
    5. exit 0; every log line is a JSON object with time, level, logger, message, and the
       drain's lines and an access line are among them.
    """
    mport = free_port()
    env = {
        "SF_METRICS_PATH": "/metrics",
        "SF_METRICS_PORT": str(mport),
        "SF_ACCESS_LOG": "0",
        "SF_DRAIN_DELAY_MS": "1500",
        "SF_RPC_SHUTDOWN_GRACE_MS": "10000",
        "SF_REPLICA_ID": "m1",
    }
    with ServerProcess(
        state_dir=tmp_path, env=env, cwd=ROOT, args=["--log-format", "json", "--access-log"]
    ) as server:
        server.wait_ready()
        base = server.url
        with httpx.Client(base_url=base, timeout=5) as c:
            for i in range(2):
                assert c.post("/api/feedback", json={"n": i}).status_code == 202
            keyed = {"idempotency-key": "k-1"}
            first = c.post("/api/feedback", json={"n": 9}, headers=keyed)
            again = c.post("/api/feedback", json={"n": 9}, headers=keyed)
            assert first.status_code == again.status_code == 202
            assert again.headers["idempotent-replayed"] == "true"
            ids = [
                c.post("/api/session/events", params={"session": "s"}, json={"e": i}).json()["id"]
                for i in range(2)
            ]
            headers = {"last-event-id": ids[0]}
            with c.stream(
                "GET", "/api/session/events", params={"session": "s"}, headers=headers
            ) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data:")) == 'data: {"e":1}'
                deadline = time.monotonic() + 10
                while True:
                    m = scrape(base + "/metrics")
                    if value(m, "sf_queue_delivered_records_total") == 3:
                        break
                    assert time.monotonic() < deadline, m
                    time.sleep(0.1)
                assert value(m, "sf_phase") == 1
                assert value(m, "sf_info", version="0.1.0", replica="m1") == 1
                assert value(m, "sf_feedback_idempotent_replays_total") == 1
                assert value(m, "sf_sse_resumes_total") == 1
                assert value(m, "sf_sse_streams_open") == 1
                assert value(m, "sf_sse_events_sent_total") == 1
                assert value(m, "sf_sse_lost_events_total") == 0
                assert value(m, "sf_queue_depth_records") == 0
                assert value(m, "sf_queue_bytes") == 0
                assert value(m, "sf_sink_errors_total") == 0
                assert value(m, "sf_shutdown_step_seconds", step="total") == 0
                # The port serves the same registry.
                assert value(scrape(f"http://127.0.0.1:{mport}/metrics"), "sf_phase") == 1
            server.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            assert c.get("/api/healthz").status_code == 503
            m = scrape(base + "/metrics")
            assert value(m, "sf_phase") == 2
            assert value(m, "sf_health_probes_503_total") == 1
            assert value(m, "sf_shutdown_step_seconds", step="drain_delay") > 0
            assert value(m, "sf_shutdown_step_seconds", step="hooks") == 0
        assert server.wait(15) == 0
        records = [json.loads(line) for line in server.logs().splitlines() if line.strip()]
    for r in records:
        assert {"time", "level", "logger", "message"} <= set(r), r
    messages = {(r["logger"], r["message"].split(":")[0]) for r in records}
    assert ("sf_lifecycle.runner", "received SIGTERM") in messages
    assert any(
        r["logger"] == "sf_lifecycle.runner" and r["message"].startswith("exit 0") for r in records
    )
    assert any(
        r["logger"] == "uvicorn.access"
        and "/api/hello" not in r["message"]
        and "POST /api/feedback" in r["message"]
        for r in records
    )


def test_library_logs_appear_under_plain_uvicorn_as_json(tmp_path: Path) -> None:
    """Steps: run the example under plain `uvicorn` (which configures only its own loggers)
    with `SF_LOG_FORMAT=json`; SIGTERM; the library's lines (ready, the lifespan drain, the
    final queue drain hook) are on stderr as JSON objects, not dropped."""
    env = {"SF_LOG_FORMAT": "json", "SF_DRAIN_DELAY_MS": "0", "SF_RPC_SHUTDOWN_GRACE_MS": "5000"}
    with ServerProcess(state_dir=tmp_path, env=env, cwd=ROOT, plain_uvicorn=True) as server:
        server.wait_ready()
        server.send_signal(signal.SIGTERM)
        server.wait(15)
        logs = server.logs()
    ours = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    by_logger = {(r["logger"], r["message"].split(" ")[0]) for r in ours}
    assert ("sf_lifecycle.lifecycle", "ready") in by_logger, logs
    assert ("sf_lifecycle.lifecycle", "draining") in by_logger, logs
    assert any(r["message"].startswith("shutdown hook feedback-drain done") for r in ours), logs
