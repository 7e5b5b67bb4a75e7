"""One error contract: every error body the library answers is an RFC 9457 problem.

In-process (httpx's ASGI transport) against an app wired the way the README shows: the
lifecycle's middleware (which serves health), the feedback route, the session event routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from sf_lifecycle import (
    FeedbackQueue,
    FileEventLog,
    Lifecycle,
    Settings,
    feedback_routes,
    session_event_routes,
)
from sf_lifecycle._problem import TITLES, TYPE_PREFIX

JSON = {"content-type": "application/json"}


@pytest.fixture
async def client_lc(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Lifecycle]]:
    settings = Settings(state_dir=tmp_path, feedback_max_bytes=64)
    lifecycle = Lifecycle(settings)
    queue = FeedbackQueue(tmp_path, settings=settings)
    queue.install(lifecycle)
    log = FileEventLog.from_settings(settings)
    routes = [*feedback_routes(queue, lifecycle), *session_event_routes(lifecycle, log)]
    app = lifecycle.install(Starlette(routes=routes))
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            yield c, lifecycle
    finally:
        await queue.close()
        await log.aclose()


def assert_problem(r: httpx.Response, status: int, code: str, **extensions: Any) -> None:
    """The exact shape: media type, no-store, the five members, and the extension facts."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["type"] == TYPE_PREFIX + code
    assert body["title"] == TITLES[code]
    assert body["status"] == status
    assert body["code"] == code
    assert isinstance(body["detail"], str)
    assert body["detail"]
    for name, value in extensions.items():
        assert body[name] == value, (name, body)


async def test_feedback_errors_are_problems(
    client_lc: tuple[httpx.AsyncClient, Lifecycle],
) -> None:
    client, _ = client_lc
    assert_problem(
        await client.post("/api/feedback", content=b"{", headers=JSON), 400, "invalid_json"
    )
    r = await client.post("/api/feedback", content=b'{"a":"' + b"x" * 100 + b'"}', headers=JSON)
    assert_problem(r, 413, "payload_too_large", limit=64)
    r = await client.post("/api/feedback", content=b"{}", headers={"content-type": "text/plain"})
    assert_problem(r, 415, "unsupported_media_type")
    r = await client.get("/api/feedback")
    assert_problem(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


async def test_session_event_errors_are_problems(
    client_lc: tuple[httpx.AsyncClient, Lifecycle],
) -> None:
    client, lifecycle = client_lc
    r = await client.get("/api/session/events", params={"session": "../x"})
    assert_problem(r, 400, "invalid_session_id")
    r = await client.get(
        "/api/session/events", params={"session": "s1"}, headers={"last-event-id": "nope"}
    )
    assert_problem(r, 400, "invalid_event_id")
    r = await client.post(
        "/api/session/events", params={"session": "s1"}, content=b"[1,", headers=JSON
    )
    assert_problem(r, 400, "invalid_json")
    r = await client.put("/api/session/events", params={"session": "s1"})
    assert_problem(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, HEAD, POST"
    lifecycle.state.begin_closing()
    r = await client.get("/api/session/events", params={"session": "s1"})
    assert_problem(r, 503, "shutting_down")
    assert r.headers["retry-after"] == "1"


async def test_health_errors_are_problems(
    client_lc: tuple[httpx.AsyncClient, Lifecycle],
) -> None:
    client, _ = client_lc
    for path in ("/api/healthz", "/api/ready", "/api/version"):
        r = await client.post(path)  # answered by the middleware, before the app's router
        assert_problem(r, 405, "method_not_allowed")
        assert r.headers["allow"] == "GET, HEAD"
        assert "POST" in r.json()["detail"]


def test_every_code_has_a_title_and_is_documented() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Errors") :]
    for code in TITLES:
        assert f"`{code}`" in section, code
