"""`ServerProcess`: the server a test talks to is the one it started."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sf_lifecycle.testing import ServerProcess, Service
from sf_lifecycle.testing.process import listens_on

from .conftest import ROOT

pytestmark = pytest.mark.integration


class _AlwaysReady(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def impostor() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _AlwaysReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_a_free_port_taken_by_another_process_is_not_mistaken_for_the_server(
    impostor: http.server.HTTPServer,
) -> None:
    """Steps:
    1. another process (here a thread of the test) answers 200 on the port the server was given,
       as when it took the free port between the pick and the server's bind;
    2. `wait_ready` sees that the server process does not hold that port's listener, starts it on
       a fresh port and returns only once the server itself answers.
    """
    taken = impostor.server_address[1]
    server = ServerProcess(cwd=ROOT)
    server.port = taken  # the race, made certain
    with server:
        server.wait_ready(30)
        assert server.port != taken
        assert listens_on(server.pid, server.port) is True
        assert server.get("/api/version")[0] == 200


def test_listens_on_tells_owner_from_stranger(impostor: http.server.HTTPServer) -> None:
    port = impostor.server_address[1]
    assert listens_on(os.getpid(), port) is True
    assert listens_on(os.getpid(), port + 1 if port < 65535 else port - 1) is False


def test_service_waits_for_and_probes_the_health_paths_under_the_prefix(tmp_path: Path) -> None:
    # The replica serves `/internal/ready`; a hard-coded `/api/ready` (404) would time out.
    svc = Service(
        "examples.sf_server:app",
        state_dir=tmp_path / "state",
        env={"SF_HEALTH_PREFIX": "/internal"},
        cwd=ROOT,
        drain_delay_ms=400,
        ready_timeout_s=20,
    )
    try:
        svc.start()
        assert svc.process.get("/internal/healthz")[0] == 200
        assert svc.process.get("/api/ready")[0] == 404
        shutdown = svc.terminate_and_wait(timeout=30)
        assert shutdown.exit_code == 0
        # The probes went to `/internal/healthz`: the replica saw a 503 probe while draining.
        assert "first_503" in shutdown.timeline.names, str(shutdown.timeline)
    finally:
        svc.close()
