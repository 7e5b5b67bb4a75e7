"""The example server on PostgreSQL (`SF_DATABASE_URL`), against real faults of a real server.

Each test runs a PostgreSQL server of its own (it stops it), and `sf-lifecycle serve` as real
subprocesses with real SIGTERM; every process is reaped by PID in a fixture.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sf_lifecycle import ExitCode
from sf_lifecycle._queue import FeedbackQueue
from sf_lifecycle.postgres import Database, PostgresSink
from sf_lifecycle.testing import PostgresServer, ServerProcess

from ._feedback import JSON, post

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SECRET = "pw-not-in-probes"  # trust authentication ignores it; the probe body must not show it


@pytest.fixture
def pg() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.close()


def database_url(pg: PostgresServer) -> str:
    return pg.create_database("srv").replace("postgres@", f"postgres:{SECRET}@")


def start(
    servers: list[ServerProcess], state: Path, url: str, env: dict[str, str] | None = None
) -> ServerProcess:
    base = {"SF_DRAIN_DELAY_MS": "0", "SF_DATABASE_URL": url, "SF_DRAIN_INTERVAL_MS": "100"}
    server = ServerProcess(state_dir=state, env={**base, **(env or {})}, cwd=ROOT)
    servers.append(server)
    server.start()
    server.wait_ready()
    return server


def stored(url: str) -> list[str]:
    """Every id in the sink's table (empty while the table does not exist yet)."""
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            return [r[0] for r in conn.execute("SELECT id FROM sf_feedback").fetchall()]
    except psycopg.errors.UndefinedTable:
        return []


def wait_stored(url: str, want: int, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    got = stored(url)
    while len(got) < want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = stored(url)
    return got


def ready_body(server: ServerProcess) -> dict[str, Any]:
    status, _, body = server.get("/api/ready")
    data: dict[str, Any] = json.loads(body)
    data["status"] = status
    return data


def test_postgres_stopped_mid_drain_then_restarted_loses_and_doubles_nothing(
    servers: list[ServerProcess], tmp_path: Path, pg: PostgresServer
) -> None:
    """1. The example server drains to PostgreSQL every 100 ms; 20 records arrive there.
    2. PostgreSQL stops; 30 more records are still acknowledged (202: the local queue).
    3. `/api/ready` stays 200 and shows the lag: the drainer's failures and last error (no
       password), the records still queued.
    4. PostgreSQL starts again on the same data: the drainer delivers the 30; every
       acknowledged id is in the table exactly once. 5. SIGTERM: exit 0.
    """
    url = database_url(pg)
    server = start(servers, tmp_path / "state", url)
    acked = post(server, 20, "before")
    assert sorted(wait_stored(url, 20)) == sorted(acked)
    pg.stop()
    acked += post(server, 30, "during")
    deadline = time.monotonic() + 15
    body = ready_body(server)
    while body["checks"]["feedback-queue"]["drainer"]["failures"] == 0:
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
        body = ready_body(server)
    queue = body["checks"]["feedback-queue"]
    assert body["status"] == 200, body
    assert queue["queued"] + queue["draining"] > 0, queue
    assert "BackendUnavailable" in queue["drainer"]["last_error"], queue
    assert SECRET not in json.dumps(body)
    pg.start()
    got = wait_stored(url, 50)
    assert sorted(got) == sorted(acked)  # all of them, each once (a list, not a set)
    assert ready_body(server)["checks"]["feedback-queue"]["drainer"]["failures"] == 0
    server.send_signal(signal.SIGTERM)
    assert server.wait(15) == ExitCode.OK, server.logs()
    assert SECRET not in server.logs()


def test_shutdown_while_postgres_is_down_keeps_the_budget_and_the_rest_on_disk(
    servers: list[ServerProcess], tmp_path: Path, pg: PostgresServer
) -> None:
    """1. Grace budget 2 s, no background drain; 25 records acknowledged; PostgreSQL stops.
    2. SIGTERM: the final drain cannot deliver; the process exits with BUDGET_EXCEEDED (4)
       about 2 s after the signal, leaving its `.draining` file on disk.
    3. PostgreSQL starts; the server restarts on the same state directory: recovery delivers
       every acknowledged id exactly once, and nothing is left on disk.
    """
    url = database_url(pg)
    state = tmp_path / "state"
    env = {"SF_RPC_SHUTDOWN_GRACE_MS": "2000", "SF_DRAIN_INTERVAL_MS": "3600000"}
    first = start(servers, state, url, env)
    acked = post(first, 25, "r")
    pg.stop()
    began = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert first.wait(10) == ExitCode.BUDGET_EXCEEDED, first.logs()
    took = time.monotonic() - began
    assert 1.8 < took < 3.5, took
    left = [p.name for p in (state / "feedback").iterdir() if p.name.endswith(".draining")]
    assert len(left) == 1
    pg.start()
    assert stored(url) == []
    second = start(servers, state, url)
    got = wait_stored(url, 25)
    assert sorted(got) == sorted(acked)
    second.send_signal(signal.SIGTERM)
    assert second.wait(15) == ExitCode.OK, second.logs()
    assert [
        p.name for p in (state / "feedback").iterdir() if p.suffix in (".draining", ".log")
    ] == []


def test_two_replicas_with_separate_state_dirs_share_keys_and_events(
    servers: list[ServerProcess], tmp_path: Path, sf_postgres: PostgresServer
) -> None:
    """1. Two example servers, each with its own state directory, on one PostgreSQL.
    2. A keyed POST on A; its retry on B replays A's id (`Idempotent-Replayed`), and another
       body under the key on B is 422.
    3. Events published on A and on B form one dense sequence (1, 2, 3) of one epoch.
    4. SIGTERM both (exit 0): the record is in the table once.
    """
    url = sf_postgres.create_database("two")
    a = start(servers, tmp_path / "a", url)
    b = start(servers, tmp_path / "b", url)
    keyed = {**JSON, "idempotency-key": "order-42"}
    status, _, body = a.get("/api/feedback", method="POST", body=b'{"v":1}', headers=keyed)
    assert status == 202, body
    rid = json.loads(body)["id"]
    status, headers, body = b.get("/api/feedback", method="POST", body=b'{"v":1}', headers=keyed)
    assert (status, json.loads(body)["id"]) == (202, rid)
    assert headers.get("idempotent-replayed") == "true"
    status, _, body = b.get("/api/feedback", method="POST", body=b'{"v":2}', headers=keyed)
    assert status == 422, body
    ids = []
    for server, n in ((a, 1), (b, 2), (a, 3)):
        status, _, body = server.get(
            "/api/session/events?session=s1", method="POST", body=b'{"n":%d}' % n, headers=JSON
        )
        assert status == 201, body
        ids.append(json.loads(body)["id"])
    assert [int(i.split("-")[1]) for i in ids] == [1, 2, 3]
    assert len({i.split("-")[0] for i in ids}) == 1
    for server in (a, b):
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == ExitCode.OK, server.logs()
    assert stored(url) == [rid]


def test_a_record_postgres_rejects_never_blocks_the_queue_nor_a_restart(
    servers: list[ServerProcess], tmp_path: Path, sf_postgres: PostgresServer
) -> None:
    """1. Three records, then one whose body holds `\\u0000` (202: legal JSON, but jsonb
       refuses it), then three more; every good one reaches PostgreSQL, the bad one is in
       `feedback/quarantine/`, a log line names its id; `/api/ready` stays 200.
    2. Another such record, then a good one; SIGKILL before the drain (interval 1 h).
    3. The replacement on the same state directory finishes its start-up recovery (healthz
       200), stores the good record and quarantines the bad one.
    """
    url = sf_postgres.create_database("poison")
    state = tmp_path / "state"
    server = start(servers, state, url)
    acked = post(server, 3, "before")
    status, _, body = server.get(
        "/api/feedback", method="POST", body=b'{"bad":"a\\u0000b"}', headers=JSON
    )
    assert status == 202, body
    bad = json.loads(body)["id"]
    acked += post(server, 3, "after")
    assert sorted(wait_stored(url, 6)) == sorted(acked)
    deadline = time.monotonic() + 10
    while bad not in server.logs():
        assert time.monotonic() < deadline, server.logs()
        time.sleep(0.05)
    assert ready_body(server)["status"] == 200
    server.send_signal(signal.SIGTERM)
    assert server.wait(15) == ExitCode.OK, server.logs()

    killed = start(servers, state, url, {"SF_DRAIN_INTERVAL_MS": "3600000"})
    status, _, body = killed.get(
        "/api/feedback", method="POST", body=b'{"bad":"\\u0000"}', headers=JSON
    )
    assert status == 202, body
    acked += post(killed, 1, "last")
    killed.kill()
    replacement = start(servers, state, url)  # waits for /api/ready: recovery finished
    assert sorted(wait_stored(url, 7)) == sorted(acked)
    quarantined = sorted((state / "feedback" / "quarantine").glob("*.rejected"))
    assert len(quarantined) == 2, replacement.logs()
    replacement.send_signal(signal.SIGTERM)
    assert replacement.wait(15) == ExitCode.OK, replacement.logs()


REDELIVER = (
    'mv "$REJECTED" "$STATE/feedback/$(printf %012x "$(date +%s%3N)")'
    '$(od -An -N5 -tx1 /dev/urandom | tr -d " \\n").000001.draining"'
)


def test_an_operator_redelivers_a_quarantined_rejected_file(
    tmp_path: Path, sf_postgres: PostgresServer
) -> None:
    """The documented re-delivery (README, "PostgreSQL"): a record a trigger refused with a
    data exception (22012) is in `feedback/quarantine/*.rejected`; the operator fixes the
    cause (drops the trigger), moves the file back into `feedback/` under a fresh segment name
    with the README's shell line, and runs `sf-lifecycle queue recover --app`: the record is
    stored once under its original id, no segment is left, the `.reason` stays as a record."""
    url = sf_postgres.create_database("redeliver")
    state = tmp_path / "state"

    async def quarantine() -> str:
        db = Database(url)
        sink = PostgresSink(db)
        await sink._ensure()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'x' "
                "USING ERRCODE = '22012'; END $$ LANGUAGE plpgsql; CREATE TRIGGER boom BEFORE "
                "INSERT ON sf_feedback FOR EACH ROW EXECUTE FUNCTION boom()"
            )
        queue = FeedbackQueue(state)
        try:
            rid = await queue.append({"order": 7})
            assert (await queue.drain(sink)).rejected == 1
            return rid
        finally:
            queue._release()
            await db.close()

    rid = asyncio.run(quarantine())
    [rejected] = (state / "feedback" / "quarantine").glob("*.rejected")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER boom ON sf_feedback")
    env = {**os.environ, "REJECTED": str(rejected), "STATE": str(state)}
    subprocess.run(["bash", "-c", REDELIVER], env=env, check=True, timeout=30)
    recover = [sys.executable, "-m", "sf_lifecycle", "queue", "recover", "--state-dir"]
    done = subprocess.run(
        [*recover, str(state), "--app", "examples.sf_server:app"],
        cwd=ROOT,
        env={**os.environ, "SF_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "recovered 1 record(s) from 1 file(s)" in done.stderr
    assert stored(url) == [rid]
    assert [p.name for p in (state / "feedback").glob("*.draining")] == []
    assert [p.name for p in (state / "feedback" / "quarantine").iterdir()] == [
        f"{rejected.name}.reason"
    ]
