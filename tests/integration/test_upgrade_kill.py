"""`docker kill` during an upgrade: SIGKILL while the queue drain is in flight, behind Traefik."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from sf_lifecycle.testing import ServerProcess, TraefikProxy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def started() -> Iterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    try:
        yield servers
    finally:
        for s in servers:
            s.close()


def replica(
    started: list[ServerProcess], state: Path, name: str, port: int | None, **env: str
) -> ServerProcess:
    base = {"SF_REPLICA_ID": name, "SF_DRAIN_DELAY_MS": "3000", "SF_DRAIN_AFTER_PROBES": "1"}
    server = ServerProcess(state_dir=state, env={**base, **env}, port=port, cwd=ROOT)
    started.append(server)
    server.start()
    server.wait_ready(timeout=30)
    return server


def delivered(state: Path) -> Counter[str]:
    """Ids in the sink; read-only, so the test never creates the database itself."""
    path = state / "feedback.sqlite3"
    if not path.exists():
        return Counter()
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            return Counter(row[0] for row in db.execute("SELECT id FROM feedback"))
        except sqlite3.OperationalError:  # created, table not yet
            return Counter()


def draining_files(state: Path) -> list[Path]:
    return sorted((state / "feedback").glob("*.draining"))


def test_sigkill_mid_drain_is_recovered_by_the_next_sf(
    tmp_path: Path, started: list[ServerProcess]
) -> None:
    """Steps:
    1. Traefik in front of `sf` (slow sink: 400 ms per 5-record batch) and `sf-candidate`;
    2. post 60 writes through Traefik; all 202;
    3. SIGTERM `sf`; once its listeners are closed and a `.draining` file exists, SIGKILL it
       (what `docker kill` does when the operator will not wait);
    4. meanwhile reads through Traefik keep succeeding (the candidate serves);
    5. start the new `sf` on the same port and state directory; `/api/ready` turns 200 once it
       has recovered the orphan; stop it cleanly;
    6. every acknowledged id is in the sink exactly once, none unknown, no `.draining` left.
    """
    state = tmp_path / "state"
    slow = {"SF_EXAMPLE_SINK_DELAY_MS": "400", "SF_DRAIN_BATCH_RECORDS": "5"}
    sf = replica(started, state, "sf-v1", None, **slow, SF_DRAIN_INTERVAL_MS="3600000")
    candidate = replica(started, state, "sf-candidate", None, SF_DRAIN_INTERVAL_MS="3600000")
    with TraefikProxy([sf.url, candidate.url]) as proxy:
        acked: list[str] = []
        for i in range(60):
            status, _, body = proxy.request(
                "/api/feedback",
                method="POST",
                body=json.dumps({"i": i}).encode(),
                headers={"content-type": "application/json"},
            )
            assert status == 202, body
            acked.append(json.loads(body)["id"])

        failures: list[int] = []
        stop = threading.Event()

        def reads() -> None:
            while not stop.is_set():
                try:
                    failures.extend([s] if (s := proxy.request("/api/hello")[0]) != 200 else [])
                except OSError:
                    failures.append(0)
                stop.wait(0.05)

        reader = threading.Thread(target=reads, daemon=True)
        reader.start()
        try:
            sf.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            while "closing listeners" not in sf.logs() or not draining_files(state):
                assert time.monotonic() < deadline, sf.logs()
                time.sleep(0.02)
            sf.kill()
            assert sf.proc is not None
            assert sf.proc.returncode == -signal.SIGKILL
            stranded = draining_files(state)
            assert stranded, "no .draining file left by the killed drain"
            partial = delivered(state)
            assert sum(partial.values()) < len(acked), "the drain finished before the kill"

            proxy.set_backends([candidate.url])
            sf2 = replica(started, state, "sf-v2", sf.port, SF_DRAIN_INTERVAL_MS="3600000")
            proxy.set_backends([sf2.url, candidate.url])
            proxy.wait_status({sf2.url: "UP"})
            assert "recover" in sf2.logs()
        finally:
            stop.set()
            reader.join(5)
        assert failures == []

        sf2.send_signal(signal.SIGTERM)
        candidate.send_signal(signal.SIGTERM)
        assert sf2.wait(15) == 0
        assert candidate.wait(15) == 0

    got = delivered(state)
    assert set(got) == set(acked), f"lost: {sorted(set(acked) - set(got))[:5]}"
    assert max(got.values()) == 1
    assert draining_files(state) == []
    assert list((state / "feedback" / "quarantine").glob("*")) == []
