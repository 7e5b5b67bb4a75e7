"""PostgreSQL backends on a real server (`sf_postgres`): the sink, the shared idempotency index,
the settings, the extra's import guard, and keyed writes while the server is down."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from starlette.applications import Starlette

from sf_lifecycle import ConfigError, Settings
from sf_lifecycle._feedback import feedback_routes
from sf_lifecycle._queue import FeedbackQueue
from sf_lifecycle.postgres import (
    BackendUnavailable,
    Database,
    PostgresIdempotencyIndex,
    PostgresSink,
)
from sf_lifecycle.testing import PostgresServer, free_port

JSON = {"content-type": "application/json"}


@pytest.fixture
async def db(sf_postgres: PostgresServer) -> AsyncIterator[Database]:
    d = Database(sf_postgres.create_database("u"))
    yield d
    await d.close()


def records(n: int, start: int = 0, key: str | None = None) -> list[dict[str, Any]]:
    return [
        {"id": f"r{i:06d}", "ts": 1_700_000_000_000 + i, "key": key, "data": {"n": i, "t": "é"}}
        for i in range(start, start + n)
    ]


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


# -- the sink --------------------------------------------------------------------------------
async def test_sink_commits_a_batch_once_and_a_redelivery_is_a_no_op(db: Database) -> None:
    sink = PostgresSink(db)
    await sink(records(2_500))
    await sink(records(2_500))  # the same batch again: nothing doubles
    await sink(records(10, start=2_495))  # overlapping: 5 new
    assert await sink.ids() == [f"r{i:06d}" for i in range(2_505)]
    got = rows(db.url, "SELECT id, idem_key, body, created_at FROM sf_feedback WHERE id='r000007'")
    rid, key, body, created = got[0]
    assert (rid, key, body) == ("r000007", None, {"n": 7, "t": "é"})
    assert int(created.timestamp() * 1000) == 1_700_000_000_007
    await sink([])  # no statement, no error


async def test_sink_table_is_a_setting_and_validated(db: Database) -> None:
    sink = PostgresSink(db, table="feedback_v2")
    await sink(records(3, key="k-1"))
    assert rows(db.url, "SELECT count(*), min(idem_key) FROM feedback_v2") == [(3, "k-1")]
    with pytest.raises(ConfigError, match="table"):
        PostgresSink(db, table='x"; DROP TABLE sf_feedback; --')


async def test_a_dead_server_raises_quickly_without_the_password() -> None:
    port = free_port()  # nothing listens there
    dead = Database(f"postgresql://u:s3cret@127.0.0.1:{port}/x", connect_timeout_s=1)
    try:
        with pytest.raises(BackendUnavailable) as info:
            await PostgresSink(dead)(records(1))
        assert "s3cret" not in str(info.value)
    finally:
        await dead.close()


# -- settings and the extra ------------------------------------------------------------------
def test_database_url_setting_is_validated_and_never_printed() -> None:
    url = "postgresql://app:hunter2@db:5432/sf"
    s = Settings.from_env({"SF_DATABASE_URL": url})
    assert s.database_url == url
    assert "hunter2" not in repr(s)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SF_DATABASE_URL": "mysql://app:hunter2@db/sf"})
    assert "SF_DATABASE_URL" in str(info.value)
    assert "hunter2" not in str(info.value)
    assert Settings.from_env({}).database_url is None


def test_the_core_imports_without_the_extra_and_the_backends_name_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['psycopg'] = None\n"
        "sys.modules['psycopg_pool'] = None\n"
        "import sf_lifecycle\n"
        "from sf_lifecycle import FeedbackQueue, SqliteSink, FileEventLog, feedback_routes\n"
        "assert 'psycopg' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n"
        "    import sf_lifecycle.postgres\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'sf-lifecycle[postgres]'" in out.stdout


# -- the shared idempotency index ------------------------------------------------------------
async def test_a_key_claimed_on_one_replica_is_seen_by_another(sf_postgres: PostgresServer) -> None:
    url = sf_postgres.create_database("i")
    da, dbb = Database(url), Database(url)
    a, b = PostgresIdempotencyIndex(da), PostgresIdempotencyIndex(dbb)
    try:
        assert await a.claim("k", "sha1") is None  # A holds it
        known = await b.claim("k", "sha1")
        assert known is not None
        assert (known.sha, known.id) == ("sha1", None)  # in flight: 409
        a.settle("k", "rec-1")
        await a.aclose()  # the background settle has run
        known = await b.claim("k", "sha1")
        assert known is not None
        assert (known.sha, known.id) == ("sha1", "rec-1")  # replay
        # A released key is free for anyone.
        assert await b.claim("k2", "s") is None
        b.release("k2")
        await b.aclose()
        assert await a.claim("k2", "s") is None
        # The delivery listener writes the id too (a settle lost to an outage is healed).
        await a.record_delivered([{"key": "k2", "sha": "s", "id": "rec-2", "ts": 1}])
        assert rows(url, "SELECT id FROM sf_idempotency WHERE key='k2'") == [("rec-2",)]
    finally:
        await da.close()
        await dbb.close()


async def test_an_abandoned_claim_and_an_expired_key_can_be_taken_over(db: Database) -> None:
    dead = PostgresIdempotencyIndex(db, claim_timeout_s=0.2)  # a replica that dies
    assert await dead.claim("k", "s") is None
    live = PostgresIdempotencyIndex(db, claim_timeout_s=0.2)
    assert await live.claim("k", "s") is not None  # still in flight
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute("UPDATE sf_idempotency SET created_at = now() - interval '1 second'")
    assert await live.claim("k", "s") is None  # abandoned: taken over
    short = PostgresIdempotencyIndex(db, ttl_s=0.5)
    await short.record_delivered([{"key": "old", "sha": "s", "id": "r", "ts": 1}])
    assert await short.lookup("old") is None  # created_at 1970: expired


class Replica:
    """A feedback endpoint with its own state directory and the shared PostgreSQL index."""

    def __init__(self, state: Path, url: str, **index: Any) -> None:
        self.queue = FeedbackQueue(state)
        self.db = Database(url, connect_timeout_s=1)
        self.index = PostgresIdempotencyIndex.for_queue(self.queue, self.db, **index)
        settings = Settings(state_dir=state)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(
                app=Starlette(routes=feedback_routes(self.queue, settings))
            ),
            base_url="http://t",
        )
        self.queue._recovery.awaiting_startup = False  # no start-up hook in this app

    async def post(self, body: Any, key: str | None = None) -> httpx.Response:
        headers = dict(JSON, **({"idempotency-key": key} if key else {}))
        return await self.client.post("/api/feedback", content=json.dumps(body), headers=headers)

    async def close(self) -> None:
        await self.client.aclose()
        await self.index.aclose()
        self.queue._release()
        await self.db.close()


async def test_a_retry_on_another_replica_replays_with_the_same_rules(
    tmp_path: Path, sf_postgres: PostgresServer
) -> None:
    """Steps: a keyed POST on replica A (202, id); the retry on replica B (another state
    directory) replays that id; another body under the key is 422; the key in flight on A is
    409 on B; B's own key is stored on B."""
    url = sf_postgres.create_database("x")
    a, b = Replica(tmp_path / "a", url), Replica(tmp_path / "b", url)
    try:
        first = await a.post({"v": 1}, key="key-1")
        assert first.status_code == 202
        await a.index.aclose()
        again = await b.post({"v": 1}, key="key-1")
        assert again.status_code == 202
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        reused = await b.post({"v": 2}, key="key-1")
        assert reused.status_code == 422
        assert reused.json()["code"] == "idempotency_key_reused"
        sha = hashlib.sha256(b'{"v":3}').hexdigest()  # as the endpoint hashes the body
        assert await a.index.claim("key-2", sha) is None  # A is storing key-2
        busy = await b.post({"v": 3}, key="key-2")
        assert busy.status_code == 409
        assert busy.json()["code"] == "in_flight"
    finally:
        await a.close()
        await b.close()


@pytest.fixture
def own_server() -> Any:
    """A server of the test's own, which it may stop (the session's one keeps running)."""
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.close()


async def test_keyed_writes_answer_503_while_postgres_is_down_unkeyed_ones_are_stored(
    tmp_path: Path, own_server: PostgresServer
) -> None:
    """Steps: PostgreSQL stops; a keyed POST is 503 `idempotency_unavailable` (retryable,
    nothing stored), an unkeyed POST is 202 (the local queue); PostgreSQL starts again and the
    keyed retry is 202."""
    url = own_server.create_database("d")
    a = Replica(tmp_path / "a", url)
    try:
        assert (await a.post({"v": 0}, key="warm")).status_code == 202
        own_server.stop()
        down = await a.post({"v": 1}, key="k-down")
        assert down.status_code == 503
        assert down.json()["code"] == "idempotency_unavailable"
        assert down.headers["retry-after"] == "1"
        assert a.queue.stats().queued == 1  # only the warm-up record
        plain = await a.post({"v": 2})
        assert plain.status_code == 202
        assert a.queue.stats().queued == 2
        assert a.index.last_error is not None
        assert (await a.index.check() or {})["last_error"] == a.index.last_error
        own_server.start()
        up = await a.post({"v": 1}, key="k-down")
        assert up.status_code == 202
    finally:
        await a.close()


async def test_publishing_an_event_answers_503_while_postgres_is_down(
    own_server: PostgresServer,
) -> None:
    """Steps: publish (201); PostgreSQL stops: publish is 503 `event_store_unavailable` with
    Retry-After, nothing stored; PostgreSQL is back: the next event continues the sequence."""
    from sf_lifecycle import Lifecycle, session_event_routes
    from sf_lifecycle.postgres import PostgresEventLog

    db = Database(own_server.create_database("e"), connect_timeout_s=1)
    log = PostgresEventLog(db)
    app = Starlette(routes=session_event_routes(Lifecycle(Settings()), log))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    path = "/api/session/events?session=s"
    try:
        first = await client.post(path, content=b'{"a":1}', headers=JSON)
        assert first.status_code == 201
        own_server.stop()
        down = await client.post(path, content=b'{"a":2}', headers=JSON)
        assert down.status_code == 503
        assert down.json()["code"] == "event_store_unavailable"
        assert "retry-after" in down.headers
        own_server.start()
        back = await client.post(path, content=b'{"a":3}', headers=JSON)
        assert back.status_code == 201
        epoch = first.json()["id"].split("-")[0]
        assert back.json()["id"] == f"{epoch}-2"
        assert [e.data for e in await log.read_after("s", None)] == [{"a": 1}, {"a": 3}]
    finally:
        await client.aclose()
        await log.aclose()
        await db.close()


# -- records PostgreSQL can never store (issue 13) -------------------------------------------
def set_aside(state: Path) -> list[tuple[bytes, str]]:
    """(frames, reason) of every `.rejected` file in the queue's quarantine."""
    qdir = state / "feedback" / "quarantine"
    return [
        (p.read_bytes(), Path(f"{p}.reason").read_text()) for p in sorted(qdir.glob("*.rejected"))
    ]


async def test_a_record_postgres_rejects_is_quarantined_and_the_queue_goes_on(
    tmp_path: Path, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: three records are queued, the middle one holding `\\u0000` (legal JSON, which
    jsonb refuses); one drain stores the two good ones, moves the bad one to
    `feedback/quarantine/` (its frame and a reason naming its id and the SQLSTATE) and
    completes; a log line names the id, never the body; the next drain has nothing to do."""
    queue = FeedbackQueue(tmp_path / "s")
    sink = PostgresSink(db)
    try:
        good1 = await queue.append({"ok": 1})
        bad = await queue.append({"bad": "a\u0000b-SECRET-BODY"})
        good2 = await queue.append({"ok": 2})
        with caplog.at_level("WARNING", logger="sf_lifecycle"):
            result = await queue.drain(sink)
        assert (result.complete, result.error, result.delivered) == (True, None, 2)
        assert result.rejected == 1
        assert await sink.ids() == sorted([good1, good2])
        [(frames, reason)] = set_aside(tmp_path / "s")
        assert b"SECRET-BODY" in frames  # kept for an operator, never deleted
        assert reason == f"{bad}\tUntranslatableCharacter (SQLSTATE 22P05)\n"
        assert [r.levelname for r in caplog.records if bad in r.getMessage()] == ["ERROR"]
        assert "SECRET" not in caplog.text
        assert queue._delivery.rejected == 1
        assert queue.stats().draining == 0
        again = await queue.drain(sink)
        assert (again.complete, again.delivered) == (True, 0)
    finally:
        queue._release()


_BOOM = """
CREATE TABLE IF NOT EXISTS flag (code text);
CREATE OR REPLACE FUNCTION boom() RETURNS trigger AS $$
DECLARE c text;
BEGIN
  SELECT code INTO c FROM flag LIMIT 1;
  IF c IS NOT NULL AND NEW.body ? 'p' THEN RAISE EXCEPTION 'refused' USING ERRCODE = c; END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER boom BEFORE INSERT ON sf_feedback FOR EACH ROW EXECUTE FUNCTION boom();
"""


def _set_flag(url: str, code: str | None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM flag")
        if code is not None:
            conn.execute("INSERT INTO flag VALUES (%s)", (code,))


async def test_a_failure_after_a_rejection_logs_no_body_text(
    tmp_path: Path, sf_postgres: PostgresServer
) -> None:
    """Steps: a batch holds a record jsonb refuses (its CONTEXT quotes the JSON before the
    `\\u0000`) and a record a trigger refuses with a deadlock (40P01) during the
    record-by-record pass; the drain fails and is retried: the library's JSON log names the
    SQLSTATE and holds no text of either body."""
    from sf_lifecycle._logging import JsonFormatter

    url = sf_postgres.create_database("body_in_log")
    db = Database(url)
    sink = PostgresSink(db)
    await sink._ensure()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_BOOM)
    _set_flag(url, "40P01")
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("sf_lifecycle").addHandler(handler)
    queue = FeedbackQueue(tmp_path / "s")
    try:
        await queue.append({"card": "4111-SECRET-CARD", "note": "x\u0000y"})
        await queue.append({"p": "OTHER-SECRET"})
        result = await queue.drain(sink)
        assert result.error == "BackendUnavailable: PostgreSQL: DeadlockDetected (SQLSTATE 40P01)"
        log = buf.getvalue()
        assert "SQLSTATE 40P01" in log
        assert "SECRET" not in log
    finally:
        logging.getLogger("sf_lifecycle").removeHandler(handler)
        queue._release()
        await db.close()


@pytest.mark.parametrize("code", ["23503", "23505", "23514"])
async def test_an_integrity_violation_is_retried_not_quarantined(
    tmp_path: Path, sf_postgres: PostgresServer, code: str
) -> None:
    """Steps: a constraint an operator added refuses a record (class 23: a foreign key,
    unique or check violation that depends on other rows); the drain fails with that SQLSTATE,
    nothing is quarantined and the file stays; once the condition clears, the next drain
    stores the record. A data exception (class 22, here 22012) is still a rejection."""
    url = sf_postgres.create_database(f"integrity_{code}")
    db = Database(url)
    sink = PostgresSink(db)
    await sink._ensure()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_BOOM)
    queue = FeedbackQueue(tmp_path / "s")
    try:
        _set_flag(url, code)
        held = await queue.append({"p": 1})
        first = await queue.drain(sink)
        assert (first.complete, first.rejected) == (False, 0)
        assert first.error is not None
        assert f"SQLSTATE {code}" in first.error
        assert set_aside(tmp_path / "s") == []
        _set_flag(url, None)
        second = await queue.drain(sink)
        assert (second.complete, second.delivered, second.rejected) == (True, 1, 0)
        assert held in await sink.ids()
        _set_flag(url, "22012")
        poison = await queue.append({"p": 2})
        third = await queue.drain(sink)
        assert (third.complete, third.rejected) == (True, 1)
        assert poison not in await sink.ids()
    finally:
        queue._release()
        await db.close()


def _queue_status_json(state: Path) -> str:
    cmd = [sys.executable, "-m", "sf_lifecycle", "queue", "status", "--state-dir", str(state)]
    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


async def test_a_retried_file_quarantines_its_rejected_record_once_and_status_counts_it(
    tmp_path: Path, sf_postgres: PostgresServer
) -> None:
    """Steps: one batch per record; the 2nd record is one jsonb refuses, the 3rd meets a
    deadlock (40P01) twice, so the file is retried twice after the rejection; then the
    deadlock clears: one `.rejected` file (and its `.reason`), the record counted rejected
    once, and `sf-lifecycle queue status --json` reports 1 quarantined file and 1 rejected
    record (the `.reason` companion is not a file of its own)."""
    url = sf_postgres.create_database("rejected_once")
    db = Database(url)
    sink = PostgresSink(db)
    await sink._ensure()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_BOOM)
    _set_flag(url, "40P01")
    state = tmp_path / "s"
    queue = FeedbackQueue(state, batch_records=1)
    try:
        await queue.append({"ok": 1})
        bad = await queue.append({"bad": "a\u0000b"})
        await queue.append({"p": 1})
        results = [await queue.drain(sink), await queue.drain(sink)]
        assert [r.complete for r in results] == [False, False]
        _set_flag(url, None)
        results.append(await queue.drain(sink))
        assert results[-1].complete
        assert sum(r.rejected for r in results) == 1
        assert queue._delivery.rejected == 1
        [(_, reason)] = set_aside(state)
        assert reason.startswith(f"{bad}\t")
        assert len(list((state / "feedback" / "quarantine").iterdir())) == 2
    finally:
        queue._release()
        await db.close()
    status = await asyncio.to_thread(_queue_status_json, state)
    info = json.loads(status)
    assert (info["quarantined"], info["files"]["quarantined"], info["rejected"]) == (1, 1, 1)


async def test_the_sink_commits_the_good_records_and_names_the_rejected_ones(
    db: Database,
) -> None:
    """A batch with two poison records: the sink commits the rest and raises
    `RecordsRejected` with exactly their ids and the SQLSTATE, never body content."""
    from sf_lifecycle import RecordsRejected

    batch = records(5)
    batch[1]["data"] = {"x": "\u0000"}
    batch[3]["data"] = ["y\u0000z"]
    sink = PostgresSink(db)
    with pytest.raises(RecordsRejected) as info:
        await sink(batch)
    assert info.value.ids == ("r000001", "r000003")
    assert info.value.reason == "UntranslatableCharacter (SQLSTATE 22P05)"
    assert await sink.ids() == ["r000000", "r000002", "r000004"]


async def test_a_claim_taken_over_after_its_replica_died_never_makes_a_second_row(
    tmp_path: Path, sf_postgres: PostgresServer
) -> None:
    """Steps: replica A stores a keyed record in its local queue and dies before settling the
    key (its settle never runs, its memory is gone); the retry on replica B is 409 until the
    claim timeout, then B takes the claim over and answers 202 with the id A stored under;
    A's orphan is delivered afterwards (recovery): one row for the key, with that id."""
    url = sf_postgres.create_database("takeover")
    a = Replica(tmp_path / "a", url, claim_timeout_s=0.3)
    b = Replica(tmp_path / "b", url, claim_timeout_s=0.3)
    try:
        a.index.settle = lambda key, record_id: None  # type: ignore[method-assign]
        first = await a.post({"order": 42}, key="order-42")
        assert first.status_code == 202
        a.index._memory.clear()  # the process died: what it held in memory is gone
        assert (await b.post({"order": 42}, key="order-42")).status_code == 409
        await asyncio.sleep(0.5)
        assert (await b.post({"order": 43}, key="order-42")).status_code == 422
        retry = await b.post({"order": 42}, key="order-42")
        assert retry.status_code == 202
        assert retry.json() == first.json()  # the id A's record may already carry
        sink = PostgresSink(b.db)
        assert (await b.queue.drain(sink)).complete
        assert (await a.queue.drain(sink)).complete  # A's orphan, recovered
        got = rows(url, "SELECT id, body FROM sf_feedback WHERE idem_key = 'order-42'")
        assert got == [(first.json()["id"], {"order": 42})]
        again = await b.post({"order": 42}, key="order-42")
        assert again.json() == first.json()
    finally:
        await a.close()
        await b.close()


async def test_a_takeover_that_fails_to_store_keeps_the_pending_id_for_the_next_retry(
    tmp_path: Path, sf_postgres: PostgresServer
) -> None:
    """Steps: replica A stores a keyed record and dies before settling it; after the claim
    timeout the retry lands on B, which takes the claim over but is shutting down (503
    `queue_closed`: nothing stored); the next retry lands on C and answers 202 with A's id,
    at once (no second claim timeout); C drains, A's orphan is recovered: one row for the key."""
    url = sf_postgres.create_database("takeover_release")
    a, b, c = (Replica(tmp_path / n, url, claim_timeout_s=0.3) for n in "abc")
    try:
        a.index.settle = lambda key, record_id: None  # type: ignore[method-assign]
        first = await a.post({"order": 42}, key="K")
        assert first.status_code == 202
        a.queue._simulate_crash()
        a.index._memory.clear()
        await asyncio.sleep(0.5)
        await b.queue.close()
        refused = await b.post({"order": 42}, key="K")
        assert (refused.status_code, refused.json()["code"]) == (503, "queue_closed")
        await b.index.aclose()  # its release reached PostgreSQL
        retry = await c.post({"order": 42}, key="K")
        assert (retry.status_code, retry.json()) == (202, first.json())
        sink = PostgresSink(c.db)
        assert (await c.queue.drain(sink)).complete
        recovered = FeedbackQueue(tmp_path / "a")
        recovered._recovery.awaiting_startup = False
        try:
            assert (await recovered.recover(sink)).delivered == 1
        finally:
            recovered._release()
        got = rows(url, "SELECT id, body FROM sf_feedback WHERE idem_key = 'K'")
        assert got == [(first.json()["id"], {"order": 42})]
    finally:
        for r in (a, b, c):
            await r.close()


def _server_pids(server: PostgresServer) -> list[int]:
    """The postmaster and its children (the backends serving our connections)."""
    assert server.proc is not None
    out = subprocess.run(
        ["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True, check=False
    )
    return [server.proc.pid, *(int(p) for p in out.stdout.split())]


async def test_a_hung_server_answers_keyed_writes_503_within_seconds_and_bounds_the_sink(
    tmp_path: Path, own_server: PostgresServer
) -> None:
    """Steps: a keyed POST (202) warms the pool; PostgreSQL is frozen (SIGSTOP: the port
    still accepts, nothing answers); an unkeyed POST is 202 (the local queue); a keyed POST
    answers 503 `idempotency_unavailable` within seconds (the default call bound, 5 s);
    a sink call raises `BackendUnavailable` within its bound too; the server thaws
    (SIGCONT) and the keyed retry is 202."""
    import os
    import signal
    import time

    url = own_server.create_database("hang")
    a = Replica(tmp_path / "a", url)
    pids: list[int] = []
    try:
        assert (await a.post({"v": 0}, key="warm")).status_code == 202
        pids = _server_pids(own_server)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        assert (await a.post({"v": 1})).status_code == 202
        began = time.monotonic()
        hung = await asyncio.wait_for(a.post({"v": 2}, key="k-hung"), 15)
        assert hung.status_code == 503
        assert hung.json()["code"] == "idempotency_unavailable"
        assert time.monotonic() - began < 8
        began = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(PostgresSink(a.db, timeout_s=2)(records(3)), 15)
        assert time.monotonic() - began < 5
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    try:
        back = await asyncio.wait_for(a.post({"v": 2}, key="k-hung"), 15)
        assert back.status_code == 202
    finally:
        await a.close()
