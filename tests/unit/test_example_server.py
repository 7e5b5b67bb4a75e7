"""The example server's test switch for a bad release: `SF_EXAMPLE_FAIL_RATE`."""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import httpx
import pytest

from sf_lifecycle import ConfigError, Settings


@pytest.fixture(scope="module")
def sf_server(tmp_path_factory: pytest.TempPathFactory) -> types.ModuleType:
    """The example module; importing it builds `app`, which needs a state directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SF_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        return importlib.import_module("examples.sf_server")


@pytest.mark.parametrize(("raw", "rate"), [("", 0.0), ("0", 0.0), ("0.3", 0.3), ("1", 1.0)])
def test_fail_rate_reads_a_share(sf_server: types.ModuleType, raw: str, rate: float) -> None:
    fail_rate = sf_server.fail_rate
    assert fail_rate({"SF_EXAMPLE_FAIL_RATE": raw}) == rate
    assert fail_rate({}) == 0.0


@pytest.mark.parametrize("raw", ["1.5", "-0.1", "nan", "half"])
def test_bad_fail_rate_is_a_start_up_error_naming_the_variable(
    sf_server: types.ModuleType, raw: str
) -> None:
    with pytest.raises(ConfigError, match=r"invalid SF_EXAMPLE_FAIL_RATE=.*between 0 and 1"):
        sf_server.fail_rate({"SF_EXAMPLE_FAIL_RATE": raw})


async def test_hello_fails_for_that_share_and_nothing_else_does(
    sf_server: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_app = sf_server.create_app
    monkeypatch.setenv("SF_EXAMPLE_FAIL_RATE", "1")
    app = create_app(Settings(state_dir=tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/api/hello")
        assert r.status_code == 500
        assert r.json() == {"error": "injected failure (SF_EXAMPLE_FAIL_RATE)"}
        assert (await c.get("/api/slow", params={"seconds": "0"})).status_code == 200
        assert (await c.get("/api/version")).status_code == 200
    monkeypatch.setenv("SF_EXAMPLE_FAIL_RATE", "0")
    app = create_app(Settings(state_dir=tmp_path / "b"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert {(await c.get("/api/hello")).status_code for _ in range(20)} == {200}


async def test_live_page_is_served_at_the_root_with_no_external_asset(
    sf_server: types.ModuleType, tmp_path: Path
) -> None:
    """`/` is the live page: HTML, not cached, every script and style inline, nothing loaded
    from another host (it must work offline and through any proxy)."""
    app = sf_server.create_app(Settings(state_dir=tmp_path, replica_id="sf-v1"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-sf-replica"] == "sf-v1"
    page = r.text
    assert "new EventSource(" in page
    assert 'id="publish"' in page
    assert "http://" not in page
    assert "https://" not in page
    assert " src=" not in page


async def test_a_stream_asked_to_announce_begins_with_its_replica(
    sf_server: types.ModuleType, tmp_path: Path
) -> None:
    """`announce=1` makes the stream's first message `event: replica` naming this replica (no
    `id:`, so Last-Event-ID is untouched); without it the stream is unchanged."""
    sent: list[dict[str, object]] = []
    inner_messages = [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.body", "body": b"id: 1-1\ndata: {}\n\n", "more_body": False},
    ]

    async def stream(scope: object, receive: object, send: object) -> None:
        for message in inner_messages:
            await send(message)  # type: ignore[operator]

    async def record(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    wrapped = sf_server.AnnounceReplica(stream, replica="sf-v2")
    scope = {"type": "http", "method": "GET", "path": "/api/session/events"}
    await wrapped({**scope, "query_string": b"session=s&announce=1"}, receive, record)
    assert [m.get("body") for m in sent] == [
        None,
        b"event: replica\ndata: sf-v2\n\n",
        b"id: 1-1\ndata: {}\n\n",
    ]
    sent.clear()
    await wrapped({**scope, "query_string": b"session=s"}, receive, record)
    assert [m.get("body") for m in sent] == [None, b"id: 1-1\ndata: {}\n\n"]
