"""`sf-lifecycle serve` as an operator runs it: flags over the app's own `Settings`, the
environment under them, and the uvicorn flags production users pass."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from sf_lifecycle.testing import ServerProcess
from sf_lifecycle.testing.process import reap

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.integration.pinned_app:app"


def test_flags_and_environment_win_over_the_apps_settings(tmp_path: Path) -> None:
    """Steps:
    1. Serve an app built with `Settings(replica_id="pinned", port=1)` with `--port P`,
       `SF_PORT` and `SF_REPLICA_ID` set to other values and `SF_DRAIN_DELAY_MS=400ms`.
    2. It listens on P (flag over code over environment), reports replica `pinned` (code over
       environment) and logs each setting's source.
    3. SIGTERM: the drain delay is the environment's 400 ms, not the 5 s default; exit 0.
    """
    env = {"SF_PORT": "1", "SF_REPLICA_ID": "env-id", "SF_DRAIN_DELAY_MS": "400ms"}
    with ServerProcess(APP, state_dir=tmp_path, cwd=ROOT, env=env) as server:
        server.wait_ready()
        status, headers, _body = server.get("/api/version")
        assert status == 200
        assert headers["x-sf-replica"] == "pinned"
        logs = server.logs()
        assert f"port={server.port} (--port)" in logs
        assert "replica_id='pinned' (code)" in logs
        assert "drain_delay_ms=400 (SF_DRAIN_DELAY_MS)" in logs
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
        assert "serving for up to 400 ms" in server.logs()


def test_uds_and_root_path_are_passed_to_uvicorn(tmp_path: Path) -> None:
    """Steps: serve on a Unix socket with `--root-path /svc`; a request over the socket is
    answered and the app sees `root_path` `/svc`; SIGTERM drains and exits 0."""
    sock = tmp_path / "sf.sock"
    server = ServerProcess(
        APP,
        state_dir=tmp_path,
        cwd=ROOT,
        env={"SF_DRAIN_DELAY_MS": "100"},
        args=["--uds", str(sock), "--root-path", "/svc"],
    )
    with server:
        deadline = time.monotonic() + 15
        while "Uvicorn running on unix socket" not in server.logs():
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.05)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=5) as client:
            assert client.get("http://sf/api/healthz").status_code == 200
            r = client.get("http://sf/root")
            assert (r.status_code, r.text) == (200, "/svc")
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0


def test_limit_concurrency_answers_503_beyond_the_limit(tmp_path: Path) -> None:
    """Steps: serve with `--limit-concurrency 1`; hold one request open; another request is
    answered 503 problem+json with `Retry-After` while the health paths still answer 200;
    release the first, which completes with 200, and the app takes requests again."""
    server = ServerProcess(
        APP,
        state_dir=tmp_path,
        cwd=ROOT,
        env={"SF_DRAIN_DELAY_MS": "100"},
        args=["--limit-concurrency", "1"],
    )
    with server:
        server.wait_ready()
        held: dict[str, int] = {}

        def hold() -> None:
            held["status"] = server.get("/slow", timeout=15)[0]

        t = threading.Thread(target=hold)
        t.start()
        try:
            deadline = time.monotonic() + 10
            while True:  # until the held request is in the app
                status, headers, body = server.get("/root")
                if status == 503:
                    break
                assert time.monotonic() < deadline, server.logs()
                time.sleep(0.05)
            assert headers.get("retry-after") == "1"
            assert json.loads(body)["code"] == "over_capacity"
            assert server.get("/api/version")[0] == 200
            assert server.get("/api/livez")[0] == 200
        finally:
            (tmp_path / "release").touch()
            t.join(20)
        assert held == {"status": 200}
        assert server.get("/root")[0] == 200
    assert server.proc is not None
    assert reap(server.proc, 1) == 0
