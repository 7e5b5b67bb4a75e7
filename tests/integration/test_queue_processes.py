"""The feedback queue against real processes: concurrent writers, SIGKILL, the grace budget.

Every process a test starts is reaped in a `finally` (ServerProcess.close, or kill + wait by PID).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sf_lifecycle import ExitCode
from sf_lifecycle.testing import ServerProcess

from ._feedback import JSON, post

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def start(
    started: list[ServerProcess], state: Path, env: dict[str, str] | None = None
) -> ServerProcess:
    base = {"SF_DRAIN_DELAY_MS": "0", "SF_DRAIN_INTERVAL_MS": "3600000"}
    server = ServerProcess(state_dir=state, env={**base, **(env or {})}, cwd=ROOT)
    started.append(server)
    server.start()
    return server


def delivered(state: Path) -> list[str]:
    db = state / "feedback.sqlite3"
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM feedback")]
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return []  # the server is creating the table right now
    finally:
        conn.close()


def segment_files(state: Path, suffix: str) -> list[str]:
    return sorted(n for n in (state / "feedback").iterdir() if n.name.endswith(suffix))  # type: ignore[misc]


def restart_and_check(servers: list[ServerProcess], state: Path, acked: list[str]) -> None:
    """Start on the same state dir, wait for recovery (ready), stop cleanly, check the sink."""
    again = start(servers, state)
    again.wait_ready()
    again.send_signal(signal.SIGTERM)
    assert again.wait(15) == 0, again.logs()
    got = Counter(delivered(state))
    assert set(acked) <= set(got), "an acknowledged record was lost"
    assert all(n == 1 for n in got.values())
    assert segment_files(state, ".draining") == []
    assert segment_files(state, ".log") == []


@pytest.mark.parametrize(
    ("point", "in_sink"),
    [
        ("drain.after_rename", 0),  # renamed, nothing delivered
        ("drain.after_sink_commit", 4),  # the first batch committed
        ("drain.before_unlink", 12),  # all delivered, file not yet removed: redelivered later
    ],
)
def test_sigkill_at_a_drain_crash_point_loses_nothing(
    servers: list[ServerProcess], tmp_path: Path, point: str, in_sink: int
) -> None:
    """1. Start with SF_CRASH_AT=point, a slow sink and batches of 4; post 12 records (202 each).
    2. SIGTERM: the final drain renames the segment and the process SIGKILLs itself at `point`.
    3. A `.draining` file remains. 4. Restart: recovery delivers every acked id exactly once.
    """
    state = tmp_path / "state"
    env = {"SF_CRASH_AT": point, "SF_EXAMPLE_SINK_DELAY_MS": "50", "SF_DRAIN_BATCH_RECORDS": "4"}
    first = start(servers, state, env)
    first.wait_ready()
    acked = post(first, 12)
    first.send_signal(signal.SIGTERM)
    assert first.wait(15) == -signal.SIGKILL
    assert f"sf-crashpoint: SIGKILL at {point}" in first.logs()
    assert len(segment_files(state, ".draining")) == 1
    assert len(delivered(state)) == in_sink
    restart_and_check(servers, state, acked)


def test_sigkill_from_outside_mid_drain_then_again_during_recovery(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    """1. Post 20 records; SIGTERM with a sink taking 300 ms per batch of 4.
    2. Once the sink has committed some records (seen in SQLite), SIGKILL from outside.
    3. Restart with SF_CRASH_AT=recover.after_claim: the recoverer dies holding the claim.
    4. Restart again: everything acked is delivered exactly once, nothing left on disk.
    """
    state = tmp_path / "state"
    env = {"SF_EXAMPLE_SINK_DELAY_MS": "300", "SF_DRAIN_BATCH_RECORDS": "4"}
    first = start(servers, state, env)
    first.wait_ready()
    acked = post(first, 20)
    first.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not delivered(state) and time.monotonic() < deadline:
        time.sleep(0.02)
    first.kill()
    assert 0 < len(delivered(state)) < 20
    assert len(segment_files(state, ".draining")) == 1
    second = start(servers, state, {"SF_CRASH_AT": "recover.after_claim"})
    assert second.wait(15) == -signal.SIGKILL
    assert len(segment_files(state, ".draining")) == 1
    restart_and_check(servers, state, acked)


def test_sigkill_between_write_and_fsync_keeps_every_acked_record(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    """1. SF_CRASH_AT=append.after_write:6: the 6th append dies before its fsync (no 202).
    2. Restart: the 5 acknowledged records are delivered; at most the unacknowledged one more.
    """
    state = tmp_path / "state"
    first = start(servers, state, {"SF_CRASH_AT": "append.after_write:6"})
    first.wait_ready()
    acked = post(first, 5)
    with pytest.raises(ConnectionError):  # reset by the SIGKILL: never acknowledged
        post(first, 1)
    assert first.wait(15) == -signal.SIGKILL
    restart_and_check(servers, state, acked)
    assert len(delivered(state)) <= 6


def test_grace_budget_exceeded_exits_4_on_time_and_the_rest_is_recovered(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    """1. Grace budget 2 s; the sink takes 400 ms per batch of 5; post 50 records (4 s of drain).
    2. SIGTERM: the process exits with ExitCode.BUDGET_EXCEEDED (4) about 2 s later.
    3. Restart: the rest is recovered; every acked id delivered exactly once.
    """
    state = tmp_path / "state"
    env = {
        "SF_RPC_SHUTDOWN_GRACE_MS": "2000",
        "SF_EXAMPLE_SINK_DELAY_MS": "400",
        "SF_DRAIN_BATCH_RECORDS": "5",
    }
    first = start(servers, state, env)
    first.wait_ready()
    acked = post(first, 50)
    began = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert first.wait(10) == ExitCode.BUDGET_EXCEEDED, first.logs()
    took = time.monotonic() - began
    assert 1.8 < took < 3.5, took
    assert 0 < len(delivered(state)) < 50
    assert len(segment_files(state, ".draining")) == 1
    restart_and_check(servers, state, acked)


def test_two_servers_start_at_the_same_instant_on_a_fresh_state_dir(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    """1. Two servers start together on a state dir that does not exist yet.
    2. Both become ready (folders and SQLite created concurrently without failing).
    3. Both take writes and stop cleanly; every acked id is in the sink once.
    """
    state = tmp_path / "fresh"
    a = start(servers, state, {"SF_DRAIN_INTERVAL_MS": "50"})
    b = start(servers, state, {"SF_DRAIN_INTERVAL_MS": "50"})
    a.wait_ready()
    b.wait_ready()
    acked = post(a, 10, "a") + post(b, 10, "b")
    for s in (a, b):
        s.send_signal(signal.SIGTERM)
    assert [a.wait(15), b.wait(15)] == [0, 0], a.logs() + b.logs()
    assert sorted(delivered(state)) == sorted(acked)


WRITER = r"""
import asyncio, json, os, sys
from sf_lifecycle._queue import FeedbackQueue
from sf_lifecycle._sink import SqliteSink

state, n, mode, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

async def main():
    q = FeedbackQueue(state, drain_interval_ms=20, batch_records=16)
    sink = SqliteSink(os.path.join(state, "feedback.sqlite3"))
    q.start_drainer(sink)
    acked = []
    async def writer(k):
        for i in range(n // 8):
            acked.append(await q.append({"w": k, "i": i, "pad": "x" * 250}))
    await asyncio.gather(*(writer(k) for k in range(8)))
    with open(out, "w") as f:
        f.write("\n".join(acked))
    if mode == "die":
        os._exit(0)  # no final drain, no lock release: the kernel drops the flock
    sink_ids = None
    await q.close()
    sink.close()

asyncio.run(main())
"""

RECOVERER = r"""
import asyncio, os, sys
from sf_lifecycle._queue import FeedbackQueue
from sf_lifecycle._sink import SqliteSink

state, stop = sys.argv[1], sys.argv[2]

async def main():
    q = FeedbackQueue(state)
    sink = SqliteSink(os.path.join(state, "feedback.sqlite3"))
    while not os.path.exists(stop):
        await q.recover(sink)
        await asyncio.sleep(0.02)
    await q.recover(sink)
    q.sink = sink
    await q.close()
    sink.close()
    print("recoverer done", flush=True)

asyncio.run(main())
"""


def test_four_writer_processes_and_a_recoverer_lose_and_duplicate_nothing(
    tmp_path: Path,
) -> None:
    """1. Four processes append 200 records each (8 concurrent writers per process), each with
       its own background drainer; two exit cleanly, two die without draining.
    2. Meanwhile a fifth process runs recovery in a loop (it must skip the live writers).
    3. Afterwards every acked id is in the sink exactly once, and no segment is left.
    """
    state = tmp_path / "state"
    state.mkdir()
    stop = tmp_path / "stop"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        rec = subprocess.Popen(
            [sys.executable, "-c", RECOVERER, str(state), str(stop)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        procs.append(rec)
        for k in range(4):
            mode = "die" if k % 2 else "clean"
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        WRITER,
                        str(state),
                        "200",
                        mode,
                        str(tmp_path / f"acked{k}"),
                    ],
                    cwd=ROOT,
                )
            )
        assert [p.wait(60) for p in procs[1:]] == [0, 0, 0, 0]
        stop.touch()
        out, _ = rec.communicate(timeout=60)
        assert rec.returncode == 0
        assert b"recoverer done" in out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    acked = [i for k in range(4) for i in (tmp_path / f"acked{k}").read_text().split()]
    assert len(acked) == 800
    conn = sqlite3.connect(state / "feedback.sqlite3")
    rows = conn.execute("SELECT id, body FROM feedback").fetchall()
    conn.close()
    assert sorted(r[0] for r in rows) == sorted(acked)
    assert all(json.loads(r[1])["pad"] == "x" * 250 for r in rows)
    assert segment_files(state, ".draining") == []
    assert segment_files(state, ".log") == []


# -- issue 11: recovery that fails, peers that die later, `queue recover` and the index ---------

QUEUE_APP = "tests.integration.queue_app:app"


def start_app(
    started: list[ServerProcess], state: Path, env: dict[str, str] | None = None
) -> ServerProcess:
    base = {"SF_DRAIN_DELAY_MS": "0", "SF_DRAIN_INTERVAL_MS": "3600000"}
    server = ServerProcess(QUEUE_APP, state_dir=state, env={**base, **(env or {})}, cwd=ROOT)
    started.append(server)
    server.start()
    return server


def post_keyed(
    server: ServerProcess, key: str, body: dict[str, object]
) -> tuple[int, dict[str, Any]]:
    status, _, raw = server.get(
        "/api/feedback",
        method="POST",
        body=json.dumps(body).encode(),
        headers={**JSON, "idempotency-key": key},
    )
    return status, json.loads(raw)


def sink_ids(db: Path) -> list[str]:
    from sf_lifecycle.testing import sqlite_sink_ids

    return sqlite_sink_ids(db)


def queue_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sf_lifecycle", "queue", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_startup_recovery_that_fails_is_retried_and_keyed_retries_keep_their_id(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    """1. A replica takes a keyed write and is SIGKILLed before draining it.
    2. The next one starts with a sink that fails its first 3 calls: /api/ready is 503 naming
       feedback-recovery and the failure, keyed POSTs are 503 "recovering" meanwhile.
    3. The retry succeeds without a restart: ready 200, the key returns the original id,
       one row in the sink.
    """
    state = tmp_path / "state"
    first = start_app(servers, state)
    first.wait_ready()
    status, body = post_keyed(first, "order-1", {"n": 1})
    assert status == 202, body
    rid = body["id"]
    first.kill()
    second = start_app(servers, state, {"QUEUE_APP_SINK_FAILURES": "3"})
    reasons, keyed = [], []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            code, _, raw = second.get("/api/ready", timeout=2)
        except OSError:
            time.sleep(0.02)
            continue
        if code == 200:
            break
        reasons.append(json.loads(raw).get("reason", ""))
        if "failed" in reasons[-1]:
            keyed.append(post_keyed(second, "order-1", {"n": 1}))
        time.sleep(0.02)
    else:
        pytest.fail(f"never ready: {reasons[-3:]}\n{second.logs()}")
    failed = [r for r in reasons if "feedback-recovery failed" in r]
    assert failed, reasons
    assert "sink unavailable" in second.logs()
    assert str(tmp_path) not in "".join(reasons)
    assert keyed, "no keyed request was sent while recovery was being retried"
    # Recovery may succeed between the probe and the POST: then the retry has its original id.
    answers = {(s, b.get("code") or b.get("id")) for s, b in keyed}
    assert (503, "recovering") in answers, keyed
    assert answers <= {(503, "recovering"), (202, rid)}, keyed
    status, body = post_keyed(second, "order-1", {"n": 1})
    assert (status, body["id"]) == (202, rid)
    second.send_signal(signal.SIGTERM)
    assert second.wait(15) == 0, second.logs()
    assert sink_ids(state / "app.sqlite3") == [rid]


def test_a_peer_killed_after_this_replica_started_is_recovered_without_a_restart(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    """1. Replica A runs with SF_ORPHAN_SWEEP_MS=500; peer B starts later on the same state dir.
    2. B acknowledges 10 records (its drainer is idle) and is SIGKILLed.
    3. Within a few sweep periods A delivers all 10, still the same process; nothing left.
    """
    state = tmp_path / "state"
    a = start(servers, state, {"SF_ORPHAN_SWEEP_MS": "500"})
    a.wait_ready()
    b = start(servers, state)
    b.wait_ready()
    acked = post(b, 10, "peer")
    b.kill()
    deadline = time.monotonic() + 10
    while set(acked) - set(delivered(state)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(delivered(state)) == sorted(acked), a.logs()
    assert a.proc is not None
    assert a.proc.poll() is None  # no restart
    assert segment_files(state, ".log") == segment_files(state, ".draining") == []
    a.send_signal(signal.SIGTERM)
    assert a.wait(15) == 0, a.logs()
    assert Counter(delivered(state)) == Counter(dict.fromkeys(acked, 1))


@pytest.mark.parametrize("point", ["drain.after_rename", "drain.after_sink_commit"])
def test_queue_recover_indexes_idempotency_keys(
    servers: list[ServerProcess], tmp_path: Path, point: str
) -> None:
    """1. A keyed write; SIGTERM with SF_CRASH_AT=point: the drain dies before the index write.
    2. `sf-lifecycle queue recover` delivers the orphan (and must record its key).
    3. Restart, retry the key: 202 with the ORIGINAL id; one row in the sink.
    """
    state = tmp_path / "state"
    first = start(servers, state, {"SF_CRASH_AT": point})
    first.wait_ready()
    status, body = post_keyed(first, "k-cli", {"n": 1})
    assert status == 202, body
    rid = body["id"]
    first.send_signal(signal.SIGTERM)
    assert first.wait(15) == -signal.SIGKILL
    done = queue_cli("recover", "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    assert "recovered 1 record(s) from 1 file(s)" in done.stderr
    again = start(servers, state)
    again.wait_ready()
    status, body = post_keyed(again, "k-cli", {"n": 1})
    assert (status, body["id"]) == (202, rid)
    again.send_signal(signal.SIGTERM)
    assert again.wait(15) == 0, again.logs()
    assert delivered(state) == [rid]


def test_queue_recover_with_app_delivers_into_the_apps_own_sink(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    """1. An app with its own sink (app.sqlite3) takes a keyed write and is SIGKILLed.
    2. `queue recover --app` delivers into app.sqlite3 (feedback.sqlite3 is never created).
    3. Restart the app: the key returns the original id; one row.
    """
    state = tmp_path / "state"
    first = start_app(servers, state)
    first.wait_ready()
    status, body = post_keyed(first, "k-app", {"n": 2})
    assert status == 202, body
    rid = body["id"]
    first.kill()
    done = queue_cli("recover", "--state-dir", str(state), "--app", QUEUE_APP)
    assert done.returncode == 0, done.stderr
    assert "recovered 1 record(s)" in done.stderr
    assert sink_ids(state / "app.sqlite3") == [rid]
    assert not (state / "feedback.sqlite3").exists()
    again = start_app(servers, state)
    again.wait_ready()
    status, body = post_keyed(again, "k-app", {"n": 2})
    assert (status, body["id"]) == (202, rid)
    again.send_signal(signal.SIGTERM)
    assert again.wait(15) == 0, again.logs()
    assert sink_ids(state / "app.sqlite3") == [rid]
    bad = queue_cli("recover", "--state-dir", str(state), "--app", "tests.integration.bare_app:app")
    assert bad.returncode == 2
    assert "installs no FeedbackQueue" in bad.stderr


def test_probes_are_answered_while_a_big_backlog_is_recovered(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    """1. The state directory holds a dead owner's 30k-record segment (~10 MB, read in pieces).
    2. A server starts on it; its sink takes 50 ms a batch, so recovery lasts a while.
    3. While /api/ready still says recovery is running, /api/livez answers 200 and
       /api/healthz answers at once (503: the proxy routes elsewhere until recovery is done):
       reading the backlog does not hold the event loop.
    4. Recovery finishes (ready 200) with every record in the sink once, no file left."""
    import asyncio

    from sf_lifecycle import FeedbackQueue
    from sf_lifecycle.testing import link_segments, write_segment

    rows = [
        json.dumps({"id": f"{k:012x}7000a{k:015x}", "ts": 0, "data": {"n": k, "t": "x" * 250}})
        for k in range(1, 30_001)
    ]
    master = write_segment(tmp_path / "master", [r.encode() for r in rows])
    state = tmp_path / "state"
    owner = FeedbackQueue(state)
    link_segments(owner, [master], orphaned=True)
    asyncio.run(owner.close())  # only the orphan is left
    server = start(servers, state, {"SF_EXAMPLE_SINK_DELAY_MS": "50"})
    server.wait_ready(path="/api/livez")
    seen_while_recovering = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, _, body = server.get("/api/ready", timeout=5.0)
        if status == 200:
            break
        recovery = json.loads(body)["checks"]["feedback-queue"]["recovery"]
        if recovery.get("state") == "running":
            live, _, _ = server.get("/api/livez", timeout=1.0)
            health, _, _ = server.get("/api/healthz", timeout=1.0)
            assert live == 200
            if health != 503:  # only if recovery finished between the two requests
                assert server.get("/api/ready", timeout=5.0)[0] == 200, (health, server.logs())
                continue
            seen_while_recovering += 1
        time.sleep(0.05)
    assert status == 200, server.logs()
    assert seen_while_recovering >= 3, "recovery was never seen running"
    got = Counter(delivered(state))
    assert set(got) == {json.loads(r)["id"] for r in rows}
    assert set(got.values()) == {1}
    assert segment_files(state, ".draining") == []


def test_the_state_dir_argument_wins_over_the_inherited_sf_state_dir(
    servers: list[ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps:
    1. SF_STATE_DIR is exported in the test runner's environment (CI set it for a service).
    2. `ServerProcess(state_dir=mine)` starts; one record is posted; SIGTERM drains it.
    3. The record is in `mine`'s sink; the inherited directory is untouched.
    """
    shell, mine = tmp_path / "shell", tmp_path / "mine"
    shell.mkdir()
    mine.mkdir()
    monkeypatch.setenv("SF_STATE_DIR", str(shell))
    server = start(servers, mine)
    server.wait_ready()
    [rid] = post(server, 1)
    assert server.stop() == 0, server.logs()
    assert delivered(mine) == [rid]
    assert list(shell.iterdir()) == []
