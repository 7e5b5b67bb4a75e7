"""Traffic gated on real readiness, through real Traefik: a replica whose readiness check fails,
or whose start-up recovery is still running, receives no proxied request."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from sf_lifecycle.testing import ServerProcess, TraefikProxy, TraefikRouting
from sf_lifecycle.testing.queue_files import write_segment

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.integration.gated_app:app"
QUICK = {"SF_DRAIN_DELAY_MS": "100", "SF_RPC_SHUTDOWN_GRACE_MS": "5000"}
ROUTING = TraefikRouting(health_interval="200ms", health_timeout="150ms", cookie_name=None)


def _orphan(state_dir: Path) -> None:
    """A dead replica's `.draining` segment of one record, as SIGKILL mid-drain leaves it."""
    from sf_lifecycle._ids import new_record_id
    from sf_lifecycle._segments import new_token, segment_path

    folder = state_dir / "feedback"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = {"id": new_record_id(), "ts": 1, "data": {"text": "left by a dead replica"}}
    path = segment_path(folder, new_token(), 1).with_suffix(".draining")
    write_segment(path, [json.dumps(record).encode()])


def _who(proxy: TraefikProxy, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, _headers, body = proxy.request("/who", timeout=5.0)
        assert status == 200, body
        seen[body.decode()] += 1
    return seen


def test_unready_replicas_get_no_proxied_request_until_ready(tmp_path: Path) -> None:
    """Steps:
    1. Start three replicas: `healthy`; `checking`, whose readiness check fails; `recovering`,
       whose start-up recovery of an orphaned segment blocks in the sink.
    2. Both unready replicas listen and answer `/api/healthz` 503 with the reason, `/api/livez`
       200.
    3. Traefik (health check every 200 ms) marks them DOWN; 30 requests through it all reach
       `healthy`.
    4. Open the check and the sink: both turn UP, and requests reach each of them; the orphan
       was delivered.
    """
    dirs = {name: tmp_path / name for name in ("healthy", "checking", "recovering")}
    for d in dirs.values():
        d.mkdir()
    _orphan(dirs["recovering"])
    common = {**QUICK, "GATED_APP_CHECK": "1"}
    (dirs["healthy"] / "check-ok").touch()
    servers = {
        name: ServerProcess(
            APP, state_dir=d, cwd=ROOT, env={**common, "SF_REPLICA_ID": name}, reap_s=10
        )
        for name, d in dirs.items()
    }
    (dirs["recovering"] / "check-ok").touch()  # only its recovery holds it back
    try:
        for s in servers.values():
            s.start()
        servers["healthy"].wait_ready(path="/api/healthz")
        for name, why in (("checking", "failing checks: gate"), ("recovering", "start-up:")):
            s = servers[name]
            s.wait_ready(path="/api/version")  # listening
            status, _h, body = s.get("/api/healthz")
            assert status == 503, body
            assert any(r.startswith(why) for r in json.loads(body)["reasons"]), body
            assert "in_flight_ages_s" in json.loads(body)
            assert s.get("/api/livez")[0] == 200  # unready is not wedged

        with TraefikProxy([servers["healthy"].url], routing=ROUTING) as proxy:
            urls = {name: s.url for name, s in servers.items()}
            proxy.set_backends(list(urls.values()))
            proxy.wait_status(
                {urls["healthy"]: "UP", urls["checking"]: "DOWN", urls["recovering"]: "DOWN"}
            )
            assert _who(proxy, 30) == Counter({"healthy": 30})

            (dirs["checking"] / "check-ok").touch()
            (dirs["recovering"] / "sink-open").touch()
            proxy.wait_status({url: "UP" for url in urls.values()})
            seen = _who(proxy, 30)
            assert seen["checking"] > 0, seen
            assert seen["recovering"] > 0, seen
        status, _h, body = servers["recovering"].get("/api/ready")
        assert status == 200, body
    finally:
        for s in servers.values():
            s.close()
