"""Acknowledged writes for the process tests: POST records, keep the ids the server returned."""

from __future__ import annotations

import json

from sf_lifecycle.testing import ServerProcess

JSON = {"content-type": "application/json"}


def post(server: ServerProcess, n: int, tag: str = "r") -> list[str]:
    """POST `n` records `{tag: i}` to `/api/feedback`; each must be acknowledged (202)."""
    ids = []
    for i in range(n):
        body = json.dumps({tag: i}).encode()
        status, _, raw = server.get("/api/feedback", method="POST", body=body, headers=JSON)
        assert status == 202, raw
        ids.append(json.loads(raw)["id"])
    return ids
