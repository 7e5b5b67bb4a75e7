"""Issue 11, defect 10 and its class: JSON bodies at their edges get a 4xx naming the problem.

Both endpoints that read a JSON body (`POST /api/feedback`, `POST /api/session/events`) run in
the example app with its lifespan, through httpx's ASGI transport. For every shape below: the
exact status, a JSON error body, never a 5xx. Limits (README, "JSON bodies"): numbers must be
finite doubles (1e400 is refused, 1e-400 is accepted as 0.0), integers at most 4,300 digits,
nesting at most 64 arrays/objects deep, strings valid Unicode (no lone surrogate), no duplicate
key at any depth, no BOM, size at most `feedback_max_bytes` (exactly the limit is accepted).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from sf_lifecycle._config import Settings
from sf_lifecycle._events_file import FileEventLog
from sf_lifecycle._jsonbody import MAX_DEPTH

from ._harness import example_create_app

LIMIT = 16_384
ENDPOINTS = ["/api/feedback", "/api/session/events?session=j"]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = example_create_app()(Settings(state_dir=tmp_path, feedback_max_bytes=LIMIT))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


def obj(inner: bytes) -> bytes:
    return b'{"x": ' + inner + b"}"


def nested(depth: int) -> bytes:
    """A body `depth` containers deep, an object at the top (the feedback endpoint wants one)."""
    return b'{"x": ' + b"[" * (depth - 1) + b"1" + b"]" * (depth - 1) + b"}"


REFUSED = {
    "overflow": (obj(b"1e400"), "out of range"),
    "negative overflow": (obj(b"-1e400"), "out of range"),
    "overflow by digits": (obj(b"1" * 400 + b".0"), "out of range"),
    "lone high surrogate": (obj(b'"\\ud800"'), "surrogate"),
    "lone low surrogate in a key": (b'{"\\udc00": 1}', "surrogate"),
    "reversed pair": (obj(b'"\\udc00\\ud800"'), "surrogate"),
    "5,000 nested arrays": (b"[" * 5000, "deep"),
    "5,000 nested, closed": (nested(5000), "deep"),
    "one over the depth limit": (nested(MAX_DEPTH + 1), "deep"),
    "huge integer": (obj(b"9" * 5000), "digits"),
    "duplicate key, nested": (b'{"a": {"b": 1, "b": 2}}', "duplicate"),
    "BOM": (b"\xef\xbb\xbf" + obj(b"1"), "BOM"),
    "raw NUL in a string": (obj(b'"a\x00b"'), "invalid"),
    "bad escape": (obj(b'"\\uZZZZ"'), "invalid"),
    "invalid UTF-8": (obj(b'"\xed\xa0\x80"'), "UTF-8"),  # a surrogate encoded as UTF-8
    "NaN": (obj(b"NaN"), "not valid JSON"),
}


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_edges_are_refused_with_400_and_a_json_body(
    client: httpx.AsyncClient, path: str, case: str
) -> None:
    body, words = REFUSED[case]
    r = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text)
    problem = r.json()
    text = json.dumps(problem)
    assert words.lower() in text.lower(), problem


ACCEPTED = {
    "underflow to zero": (obj(b"1e-400"), {"x": 0.0}),
    "largest double": (obj(b"1.7976931348623157e308"), {"x": 1.7976931348623157e308}),
    "valid surrogate pair": (obj(b'"\\ud83d\\ude00"'), {"x": "\U0001f600"}),
    "escaped NUL": (obj(b'"a\\u0000b"'), {"x": "a\x00b"}),
    "4,300-digit integer": (obj(b"9" * 4300), {"x": int("9" * 4300)}),
    "at the depth limit": (nested(MAX_DEPTH), None),
    "brackets in strings do not count": (obj(json.dumps("[" * 5000).encode()), {"x": "[" * 5000}),
}


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("case", sorted(ACCEPTED))
async def test_edges_within_the_limits_are_accepted(
    client: httpx.AsyncClient, tmp_path: Path, path: str, case: str
) -> None:
    body, want = ACCEPTED[case]
    r = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (201, 202), (r.status_code, r.text)
    if want is not None and path.endswith("=j"):  # stored as parsed, and readable back
        log = FileEventLog(tmp_path)
        events = await log.read_after("j", None)
        assert events[-1].id == r.json()["id"]
        assert events[-1].data == want


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_exactly_the_size_limit_is_accepted_one_more_byte_is_413(
    client: httpx.AsyncClient, path: str
) -> None:
    pad = LIMIT - len(b'{"p":""}')
    exact = b'{"p":"' + b"x" * pad + b'"}'
    assert len(exact) == LIMIT
    headers = {"content-type": "application/json"}
    r = await client.post(path, content=exact, headers=headers)
    assert r.status_code in (201, 202), r.text
    r = await client.post(path, content=exact[:-1] + b" }", headers=headers)
    assert r.status_code == 413, r.text
    assert "limit" in json.dumps(r.json())
