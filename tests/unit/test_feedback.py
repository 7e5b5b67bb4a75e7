"""POST /api/feedback: every status code, and idempotency across a restart."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from sf_lifecycle import _fs
from sf_lifecycle._config import Settings
from sf_lifecycle._feedback import feedback_routes
from sf_lifecycle._ids import is_record_id
from sf_lifecycle._queue import FeedbackQueue
from sf_lifecycle._sink import SqliteSink
from sf_lifecycle.idempotency import IdempotencyIndex

JSON = {"content-type": "application/json"}


class App:
    def __init__(self, state: Path, max_bytes: int = 200) -> None:
        self.queue = FeedbackQueue(state)
        self.index = IdempotencyIndex(self.queue.dir / "idempotency.sqlite3")
        self.queue.add_delivery_listener(self.index.record_delivered)
        settings = Settings(state_dir=state, feedback_max_bytes=max_bytes)
        self.app = Starlette(routes=feedback_routes(self.queue, settings, index=self.index))
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://t"
        )
        self.sink = SqliteSink(state / "feedback.sqlite3")

    async def post(self, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.client.post(
            "/api/feedback", content=content, headers=JSON if headers is None else headers
        )

    async def close(self) -> None:
        await self.client.aclose()
        if not self.queue._closed:
            self.queue.sink = self.sink
            await self.queue.close()
        self.index.close()
        self.sink.close()


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    a = App(tmp_path)
    yield a
    await a.close()


async def test_202_with_an_id_once_durable(app: App) -> None:
    r = await app.post({"text": "good", "n": [1, 2.5, None]})
    assert r.status_code == 202
    rid = r.json()["id"]
    assert is_record_id(rid)
    await app.queue.drain(app.sink)
    assert await app.sink.ids() == [rid]


@pytest.mark.parametrize(
    ("body", "error", "detail"),
    [
        (b"{not json", "invalid_json", "Expecting property name"),
        (b'{"x": NaN}', "invalid_json", "NaN is not valid JSON"),
        (b'{"x": -Infinity}', "invalid_json", "-Infinity is not valid JSON"),
        (b'{"a": 1, "a": 2}', "invalid_json", "duplicate key 'a'"),
        (b'{"a": "\xff"}', "invalid_utf8", "not valid UTF-8 at byte 7"),
        (b"[1, 2]", "not_an_object", "got list"),
        (b'"text"', "not_an_object", "got str"),
        (b"", "invalid_json", "Expecting value"),
    ],
)
async def test_400_names_the_problem(app: App, body: bytes, error: str, detail: str) -> None:
    r = await app.post(body)
    assert r.status_code == 400
    assert r.json()["code"] == error
    assert detail in r.json()["detail"]
    assert app.queue.stats().queued == 0


@pytest.mark.parametrize(
    "ctype",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)
async def test_415_for_non_json_content_types(app: App, ctype: str | None) -> None:
    headers = {} if ctype is None else {"content-type": ctype}
    r = await app.post({"a": 1}, headers=headers)
    assert r.status_code == 415
    assert r.json()["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "ctype", ["application/json; charset=UTF-8", "application/merge-patch+json"]
)
async def test_json_media_types_accepted(app: App, ctype: str) -> None:
    assert (await app.post({"a": 1}, headers={"content-type": ctype})).status_code == 202


async def test_413_from_content_length(app: App) -> None:
    r = await app.post({"t": "x" * 300})
    assert r.status_code == 413
    assert r.json()["limit"] == 200


async def test_413_while_streaming_stops_reading(app: App) -> None:
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"t": "'
        for _ in range(1000):
            sent += 1
            yield b"x" * 50
        yield b'"}'

    r = await app.client.post("/api/feedback", content=body(), headers=JSON)
    assert r.status_code == 413
    assert sent < 10  # rejected after the limit, not after the whole 50 kB


async def test_exactly_the_limit_is_accepted(app: App) -> None:
    body = b'{"t":"' + b"x" * 192 + b'"}'
    assert len(body) == 200
    assert (await app.post(body)).status_code == 202


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_503_when_the_disk_refuses(
    app: App, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    def write(fd: int, data: bytes) -> int:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(_fs, "os", types.SimpleNamespace(**{**vars(os), "write": write}))
    r = await app.post({"a": 1})
    assert r.status_code == 503
    assert r.json()["code"] == "disk_write_failed"
    assert r.json()["errno"] == errno.errorcode[err]
    assert r.headers["retry-after"] == "1"
    monkeypatch.undo()
    assert (await app.post({"a": 2})).status_code == 202
    await app.queue.drain(app.sink)
    assert len(await app.sink.ids()) == 1  # the refused one was never stored


async def test_503_when_the_queue_is_closed(app: App) -> None:
    app.queue.sink = app.sink
    await app.queue.close()
    r = await app.post({"a": 1})
    assert r.status_code == 503
    assert r.json()["code"] == "queue_closed"


async def test_idempotency_key_replays_409_and_422(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = {"idempotency-key": "order-42:retry", **JSON}
    first = await app.post({"a": 1, "b": 2}, key)
    assert first.status_code == 202
    again = await app.post(b'{"b": 2, "a": 1}', key)  # same JSON, other spelling
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    other = await app.post({"a": 999}, key)
    assert other.status_code == 422
    assert other.json()["code"] == "idempotency_key_reused"

    gate = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        gate.wait(5)
        real_fsync(fd)

    monkeypatch.setattr(_fs, "os", types.SimpleNamespace(**{**vars(os), "fsync": slow_fsync}))
    slow_key = {"idempotency-key": "slow", **JSON}
    pending = asyncio.ensure_future(app.post({"s": 1}, slow_key))
    for _ in range(100):
        await asyncio.sleep(0.005)
        conflict = await app.post({"s": 1}, slow_key)
        if conflict.status_code == 409:
            break
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "in_flight"
    gate.set()
    assert (await pending).status_code == 202
    await app.queue.drain(app.sink)
    assert len(await app.sink.ids()) == 2


@pytest.mark.parametrize("bad", [b"", b"x" * 129, b"has space", "ünï".encode(), b"a\tb"])
async def test_400_for_a_malformed_idempotency_key(app: App, bad: bytes) -> None:
    r = await app.client.post(
        "/api/feedback",
        content=b"{}",
        headers=[(b"idempotency-key", bad), (b"content-type", b"application/json")],
    )
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_idempotency_key"


async def test_idempotency_survives_a_restart(tmp_path: Path) -> None:
    first = App(tmp_path)
    key = {"idempotency-key": "k1", **JSON}
    rid = (await first.post({"x": 1}, key)).json()["id"]
    await first.close()  # drains: the sink commits, then the index records the key
    second = App(tmp_path)
    try:
        second.queue.recovery = {"state": "running"}
        assert (await second.post({"x": 1}, key)).status_code == 503  # cannot check yet
        second.queue.recovery = {"state": "done"}
        r = await second.post({"x": 1}, key)
        assert r.status_code == 202
        assert r.json()["id"] == rid
        assert (await second.post({"x": 2}, key)).status_code == 422
    finally:
        await second.close()
    sink = SqliteSink(tmp_path / "feedback.sqlite3")
    assert await sink.ids() == [rid]
    sink.close()


async def test_idempotency_key_of_a_crashed_process_is_indexed_by_recovery(
    tmp_path: Path,
) -> None:
    first = App(tmp_path)
    rid = (await first.post({"x": 1}, {"idempotency-key": "k2", **JSON})).json()["id"]
    first.queue._simulate_crash()  # the process "dies" before any drain
    second = App(tmp_path)
    try:
        await second.queue.recover(second.sink)
        r = await second.post({"x": 1}, {"idempotency-key": "k2", **JSON})
        assert r.json()["id"] == rid
    finally:
        await second.close()
        await first.client.aclose()
        first.index.close()
        first.sink.close()


async def test_503_not_500_and_not_ready_while_the_idempotency_index_cannot_be_used(
    tmp_path: Path,
) -> None:
    """An index that cannot be opened (a folder in its place) answers 503 JSON naming no path,
    and `/api/ready` is not 200 meanwhile: keyed writes are failing for a local reason."""
    from sf_lifecycle._lifecycle import Lifecycle

    (tmp_path / "feedback" / "idempotency.sqlite3").mkdir(parents=True)
    cfg = Settings(state_dir=tmp_path)
    lifecycle = Lifecycle(cfg)
    queue = FeedbackQueue(tmp_path, settings=cfg)
    queue.install(lifecycle)
    app = lifecycle.install(Starlette(routes=feedback_routes(queue, lifecycle)))
    await lifecycle.startup()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            for _ in range(200):
                if not queue.recovering:
                    break
                await asyncio.sleep(0.02)
            r = await c.post("/api/feedback", json={"x": 1}, headers={"idempotency-key": "k"})
            assert r.status_code == 503
            assert r.json()["code"] == "idempotency_unavailable"
            assert str(tmp_path) not in r.text
            assert (await c.post("/api/feedback", json={"x": 1})).status_code == 202
            ok, body = await lifecycle.readiness()
            assert not ok
            assert body["checks"]["idempotency-index"]["ok"] is False, body
            assert str(tmp_path) not in json.dumps(body)
            (tmp_path / "feedback" / "idempotency.sqlite3").rmdir()  # the operator's fix
            ok, body = await lifecycle.readiness()
            assert ok, body
            r = await c.post("/api/feedback", json={"x": 1}, headers={"idempotency-key": "k"})
            assert r.status_code == 202
    finally:
        await lifecycle.shutdown()


async def test_a_damaged_idempotency_index_is_quarantined_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage where the index belongs, and a keyed orphan that needs the index to be
    delivered: the file is moved to `feedback/quarantine/` (same bytes, logged with the
    reason), an empty index replaces it, recovery completes, the replica becomes ready, and
    the key is recorded again."""
    from sf_lifecycle._lifecycle import Lifecycle

    first = App(tmp_path)
    rid = (await first.post({"x": 1}, {"idempotency-key": "k-orphan", **JSON})).json()["id"]
    first.queue._simulate_crash()  # the process dies before any drain
    await first.client.aclose()
    # Closed for real before the file is overwritten: a connection closed later checkpoints
    # its WAL into the file, turning the garbage back into a valid database.
    assert first.index.close(wait_s=10)
    assert first.sink.close(wait_s=10)
    index_path = tmp_path / "feedback" / "idempotency.sqlite3"
    for side in ("-wal", "-shm"):
        index_path.with_name(index_path.name + side).unlink(missing_ok=True)
    garbage = b"not a database " * 200
    index_path.write_bytes(garbage)
    cfg = Settings(state_dir=tmp_path)
    lifecycle = Lifecycle(cfg)
    queue = FeedbackQueue(tmp_path, settings=cfg)
    queue.install(lifecycle)
    app = lifecycle.install(Starlette(routes=feedback_routes(queue, lifecycle)))
    await lifecycle.startup()
    try:
        for _ in range(250):
            ok, body = await lifecycle.readiness()
            if ok:
                break
            await asyncio.sleep(0.02)
        assert ok, body
        quarantined = [
            p
            for p in (tmp_path / "feedback" / "quarantine").iterdir()
            if p.name.startswith("idempotency.sqlite3.")
        ]
        assert [p.read_bytes() for p in quarantined] == [garbage]
        assert "idempotency.sqlite3 is damaged (file is not a database)" in caplog.text
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            r = await c.post(
                "/api/feedback", json={"x": 1}, headers={"idempotency-key": "k-orphan"}
            )
            assert (r.status_code, r.json()["id"]) == (202, rid)
            r = await c.post("/api/feedback", json={"y": 1}, headers={"idempotency-key": "k-new"})
            assert r.status_code == 202
    finally:
        await lifecycle.shutdown()
    sink = SqliteSink(tmp_path / "feedback.sqlite3")
    assert rid in await sink.ids()
    assert len(await sink.ids()) == 2
    sink.close()


async def test_an_expired_key_is_forgotten_and_purged_in_bounded_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-lived index: a key past its TTL is not found any more, and expired rows are
    deleted while the index stays open, at most `PURGE_BATCH` per purge."""
    import sqlite3
    import time

    from sf_lifecycle import idempotency as feedback_mod

    monkeypatch.setattr(feedback_mod, "PURGE_BATCH", 3)
    path = tmp_path / "idem.sqlite3"
    index = IdempotencyIndex(path, ttl_s=1, purge_interval_s=0)

    def rows() -> list[str]:
        conn = sqlite3.connect(path)
        try:
            return sorted(k for (k,) in conn.execute("SELECT key FROM idempotency"))
        finally:
            conn.close()

    try:
        now = time.time_ns() // 1_000_000
        old = [{"key": f"old{i}", "id": "a" * 32, "sha": "s", "ts": now - 5000} for i in range(5)]
        await index.record_delivered(old)  # purges 3 of the 5 expired rows on its way out
        assert rows() == ["old3", "old4"]
        await index.record_delivered([{"key": "K", "id": "b" * 32, "sha": "s", "ts": now}])
        assert rows() == ["K"]  # a full batch: the next call purged the rest
        assert (await index.lookup("K")) is not None
        await asyncio.sleep(1.2)
        assert await index.lookup("K") is None  # expired, in the same process
        assert rows() == []  # and purged by that call
        # A key used again after it expired maps to its new record.
        await index.record_delivered(
            [{"key": "K", "id": "c" * 32, "sha": "t", "ts": time.time_ns() // 1_000_000}]
        )
        found = await index.lookup("K")
        assert found is not None
        assert (found.id, found.sha) == ("c" * 32, "t")
    finally:
        index.close()
