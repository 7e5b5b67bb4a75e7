"""The state directory and the endpoints under a hostile neighbour or client.

Threat model (RELIABILITY.md): someone who can write into the state directory but is not the
service (another container on the shared volume) must not make it read, truncate or delete files
elsewhere through links; other local users must not read the records (files 0600, folders 0700);
HTTP clients must not reach the filesystem through ids, nor learn secrets from the probes.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import httpx
import pytest

from sf_lifecycle._config import Settings
from sf_lifecycle._errors import ConfigError, UnsafePath
from sf_lifecycle._events import InvalidSessionId
from sf_lifecycle._events_file import FileEventLog
from sf_lifecycle._ids import is_record_id
from sf_lifecycle._sink import SqliteSink
from sf_lifecycle.idempotency import IdempotencyIndex

from ._harness import example_create_app, leftovers, start_server

SECRET = "hunter2-s3cr3t-do-not-leak"
JSON = {"content-type": "application/json"}


async def wait_ready(c: httpx.AsyncClient) -> None:
    """Keyed writes answer 503 until start-up recovery has run: wait for it, as a proxy does."""
    for _ in range(500):
        if (await c.get("/api/ready")).status_code == 200:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never ready")


async def exercise(state: Path, **settings: object) -> None:
    """Run the example app in-process: a record, an event, a drain, so every file exists."""
    app = example_create_app()(Settings(state_dir=state, drain_interval_ms=20, **settings))  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await wait_ready(c)
            r = await c.post(
                "/api/feedback", content=b'{"a": 1}', headers={**JSON, "idempotency-key": "k"}
            )
            assert r.status_code == 202, r.text
            r = await c.post("/api/session/events?session=s1", content=b'{"e": 1}', headers=JSON)
            assert r.status_code == 201
            for _ in range(200):
                if (
                    not leftovers(state)["log"]
                    and (state / "feedback" / "idempotency.sqlite3").exists()
                ):
                    break
                await asyncio.sleep(0.02)


def modes(state: Path) -> tuple[dict[str, int], dict[str, int]]:
    files: dict[str, int] = {}
    dirs: dict[str, int] = {str(state): stat.S_IMODE(state.stat().st_mode)}
    for root, dnames, fnames in os.walk(state):
        for d in dnames:
            dirs[os.path.join(root, d)] = stat.S_IMODE(os.lstat(os.path.join(root, d)).st_mode)
        for f in fnames:
            files[os.path.join(root, f)] = stat.S_IMODE(os.lstat(os.path.join(root, f)).st_mode)
    return files, dirs


@pytest.mark.parametrize(("file_mode", "dir_mode"), [(None, None), (0o640, 0o750)])
async def test_files_are_created_private_and_the_modes_are_configurable(
    tmp_path: Path, file_mode: int | None, dir_mode: int | None
) -> None:
    state = tmp_path / "state"  # created by the library
    old = os.umask(0o022)
    try:
        kw = {} if file_mode is None else {"file_mode": file_mode, "dir_mode": dir_mode}
        await exercise(state, **kw)
    finally:
        os.umask(old)
    files, dirs = modes(state)
    names = {os.path.basename(f) for f in files}
    assert {"feedback.sqlite3", "idempotency.sqlite3", "s1.log", "s1.lock"} <= names, names
    want_f, want_d = file_mode or 0o600, dir_mode or 0o700
    assert {f: m for f, m in files.items() if m != want_f} == {}
    assert {d: m for d, m in dirs.items() if m != want_d} == {}


def test_mode_settings_parse_octal_and_refuse_unusable_modes() -> None:
    s = Settings.from_env({"SF_FILE_MODE": "0640", "SF_DIR_MODE": "750"})
    assert (s.file_mode, s.dir_mode) == (0o640, 0o750)
    assert str(Settings().file_mode) == "0600"
    for var, bad in [
        ("SF_FILE_MODE", "0400"),
        ("SF_FILE_MODE", "999"),
        ("SF_DIR_MODE", "0600"),
        ("SF_DIR_MODE", "10777"),
        ("SF_FILE_MODE", "rw"),
    ]:
        with pytest.raises(ConfigError, match=var):
            Settings.from_env({var: bad})


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    victim = tmp_path / "outside-secret.txt"
    victim.write_text(SECRET)
    return victim


async def test_sqlite_files_behind_links_are_refused(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "feedback.sqlite3").symlink_to(outside)
    sink = SqliteSink(tmp_path / "feedback.sqlite3")
    with pytest.raises(UnsafePath, match="symbolic link"):
        await sink([{"id": "x", "data": {}}])
    sink.close()
    (tmp_path / "i.sqlite3-wal").symlink_to(outside)
    index = IdempotencyIndex(tmp_path / "i.sqlite3")
    with pytest.raises(UnsafePath, match=r"i\.sqlite3-wal is a symbolic link"):
        await index.lookup("k")
    index.close()
    assert await asyncio.to_thread(outside.read_text) == SECRET


async def test_session_files_are_never_read_or_written_through_links(
    tmp_path: Path, outside: Path
) -> None:
    log = FileEventLog(tmp_path, retention_events=2)
    sessions = tmp_path / "sessions"
    (sessions / "s.log").symlink_to(outside)  # would leak the file as events
    (sessions / "s.log.tmp").symlink_to(outside)  # compaction would truncate it
    (sessions / "t.lock").symlink_to(outside)  # the lock file would be truncated
    assert await log.read_after("s", None) == []
    ids = [await log.append("s", i) for i in range(6)]  # forces a compaction (temp + rename)
    assert [e.data for e in await log.read_after("s", None)][-1] == 5
    assert ids[-1].endswith("-6")
    assert (await log.append("t", 1)).endswith("-1")  # the link moved aside, not followed
    await log.aclose()
    assert await asyncio.to_thread(outside.read_text) == SECRET
    assert not (sessions / "s.log").is_symlink()
    assert [p.name for p in sessions.iterdir() if p.name.startswith("s.corrupt-")]
    for planted in ("t.lock", "s.log.tmp"):  # never deleted: kept for an operator, as links
        [aside] = [p for p in sessions.iterdir() if p.name.startswith(planted + ".corrupt-")]
        assert aside.is_symlink()


async def test_ids_cannot_name_paths(tmp_path: Path) -> None:
    log = FileEventLog(tmp_path)
    for bad in ["../evil", "..", "a/b", "/etc/passwd", "a\x00b", "", "é", "x" * 129]:
        with pytest.raises(InvalidSessionId):
            await log.append(bad, 1)
    await log.aclose()
    assert not is_record_id("../../../../etc/passwd")
    assert not is_record_id("0" * 12 + "7" + "0" * 3 + "8" + "/" * 15)
    state = tmp_path / "app"
    app = example_create_app()(Settings(state_dir=state))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await wait_ready(c)
            for bad in ["../evil", "..%2F..%2Fx", "a/b", "%2e%2e"]:
                for method in ("GET", "POST"):
                    r = await c.request(
                        method, f"/api/session/events?session={bad}", content=b"{}", headers=JSON
                    )
                    assert r.status_code == 400, (bad, method)
                    assert "session" in r.json()["detail"]
            # An idempotency key is a database key, never a path: "../" is just characters.
            r = await c.post(
                "/api/feedback", content=b"{}", headers={**JSON, "idempotency-key": "../../evil"}
            )
            assert r.status_code == 202, r.text
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "evil.log").exists()
    assert sorted(p.name for p in (state / "sessions").iterdir()) == []


@pytest.mark.integration
def test_probe_bodies_expose_no_secret_and_no_path(tmp_path: Path) -> None:
    state = tmp_path / "state-dir-path"
    env = {
        "SF_DB_PASSWORD": SECRET,
        "DATABASE_URL": f"postgres://u:{SECRET}@db/x",
        "SF_GIT_SHA": "abc123",
        "SF_REPLICA_ID": "r1",
    }
    server = start_server(state, env)
    try:
        server.wait_ready()
        for path in ("/api/version", "/api/healthz", "/api/ready"):
            for method in ("GET", "HEAD"):
                status, headers, body = server.get(path, method=method)
                assert status == 200, (path, body)
                text = body.decode() + json.dumps(headers)
                assert SECRET not in text
                assert str(state) not in text  # no filesystem layout either
                assert "password" not in text.lower()
        _, _, version = server.get("/api/version")
        assert json.loads(version)["commit"] == "abc123"
    finally:
        server.close()
