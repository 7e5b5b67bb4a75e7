"""Scale-down on many hosts: a replica's volume outlives it, `queue recover` empties it.

What `infra/k8s/multihost/recover-job.yaml` does after `kubectl scale statefulset sf
--replicas=N`, without Kubernetes: each replica has its own state directory (its own volume)
and they all deliver into one shared sink. The sink is a fixture (`shared_sink`): SQLite in a
shared path, and PostgreSQL (`SF_DATABASE_URL`, a real server: `sf_postgres`).

Every process a test starts is reaped by PID (the `servers` fixture; `subprocess.run` waits).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sf_lifecycle.testing import PostgresServer, ServerProcess, sqlite_sink_ids

from ._feedback import post

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
APP = "tests.integration.replica_app:app"


@dataclass(frozen=True)
class SharedSink:
    """Where every replica delivers: the variables that select it, and how to read its ids."""

    env: dict[str, str]
    ids: Callable[[], list[str]]


@pytest.fixture(params=["sqlite", "postgres"])
def shared_sink(request: pytest.FixtureRequest, tmp_path: Path) -> SharedSink:
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("sf_postgres")
        url = server.create_database("scale")

        def pg_ids() -> list[str]:
            import psycopg

            try:
                with psycopg.connect(url) as conn:
                    return [r[0] for r in conn.execute("SELECT id FROM sf_feedback").fetchall()]
            except psycopg.errors.UndefinedTable:
                return []

        return SharedSink({"SF_DATABASE_URL": url}, pg_ids)
    db = tmp_path / "shared" / "feedback.sqlite3"
    db.parent.mkdir()
    return SharedSink({"REPLICA_APP_SINK_DB": str(db)}, lambda: sqlite_sink_ids(db))


def queue_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sf_lifecycle", "queue", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def status(state: Path) -> dict[str, Any]:
    done = queue_cli("status", "--state-dir", str(state), "--json")
    assert done.returncode == 0, done.stderr
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def segments(state: Path) -> list[str]:
    return sorted(
        p.name for p in (state / "feedback").iterdir() if p.name.endswith((".log", ".draining"))
    )


def test_queue_recover_empties_the_volume_of_a_replica_that_is_gone(
    servers: list[ServerProcess], tmp_path: Path, shared_sink: SharedSink
) -> None:
    """1. Replicas A and B, each on its own state dir, share the sink; A acknowledges 12
       records, B 5 (no background drain).
    2. SIGTERM A: its final drain commits the first batch of 4 and A is SIGKILLed there
       (SF_CRASH_AT): a `.draining` file stays on A's volume, 4 of A's records in the sink.
    3. A is not restarted: no replica uses its state dir any more (B never reads it).
    4. `queue recover --app` on A's dir, with the replicas' sink settings, exits 0.
    5. A's dir holds no segment and `queue status` says nothing is left: the volume can go.
    6. B stops cleanly. Every acknowledged record of A and B is in the sink exactly once.
    """
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    base = {**shared_sink.env, "SF_DRAIN_DELAY_MS": "0", "SF_DRAIN_INTERVAL_MS": "3600000"}
    a = ServerProcess(
        APP,
        state_dir=a_dir,
        cwd=ROOT,
        env={**base, "SF_CRASH_AT": "drain.after_sink_commit", "SF_DRAIN_BATCH_RECORDS": "4"},
    )
    b = ServerProcess(APP, state_dir=b_dir, cwd=ROOT, env=base)
    servers += [a, b]
    a.start()
    b.start()
    a.wait_ready()
    b.wait_ready()
    acked_a = post(a, 12, "a")
    acked_b = post(b, 5, "b")

    a.send_signal(signal.SIGTERM)
    assert a.wait(15) == -signal.SIGKILL, a.logs()
    assert "sf-crashpoint: SIGKILL at drain.after_sink_commit" in a.logs()
    assert len([s for s in segments(a_dir) if s.endswith(".draining")]) == 1
    assert len(shared_sink.ids()) == 4
    assert set(shared_sink.ids()) < set(acked_a)
    before = status(a_dir)
    assert (before["orphaned"], before["files"]["orphaned"]) == (12, 1)

    done = queue_cli("recover", "--state-dir", str(a_dir), "--app", APP, env=shared_sink.env)
    assert done.returncode == 0, done.stderr
    assert "recovered 12 record(s) from 1 file(s)" in done.stderr
    assert "0 quarantined; 0 left" in done.stderr
    assert segments(a_dir) == []
    after = status(a_dir)
    assert (after["orphaned"], after["queued"], after["draining"]) == (0, 0, 0)
    assert not (a_dir / "feedback.sqlite3").exists()  # into the shared sink, not the volume

    b.send_signal(signal.SIGTERM)
    assert b.wait(15) == 0, b.logs()
    assert Counter(shared_sink.ids()) == Counter(dict.fromkeys(acked_a + acked_b, 1))
    assert segments(b_dir) == []
