"""Every HTTP error body the library sends: RFC 9457 problem details, built here and only here.

One shape for every endpoint (feedback, session events, health), so a client parses errors
once::

    HTTP/1.1 413 Payload Too Large
    content-type: application/problem+json
    cache-control: no-store

    {"type":"tag:sf-lifecycle,2026:payload_too_large","title":"Body too large","status":413,
     "detail":"body of 300 bytes is over the limit of 200 bytes","code":"payload_too_large",
     "limit":200}

Deliberate choices:

* **`code` is the stable, machine-readable member**; `type` is the same code as a `tag:` URI
  (RFC 4151, the non-dereferenceable kind RFC 9457 section 4 suggests): nothing to fetch, and
  a client never parses a URI to branch. Both never change for a given problem; `detail` is a
  sentence for people and may be reworded.
* **`title` belongs to the type**, not to the occurrence (RFC 9457): the per-request facts go in
  `detail` and in extension members (`limit`, `errno`).
* **`detail` never names a path** of the state directory: it reaches clients.
* Every problem is `cache-control: no-store`; a 503 carries `Retry-After` (the caller decides
  how long).

The codes and their titles are listed in `TITLES` (and in README.md, "Errors").
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "TITLES",
    "TYPE_PREFIX",
    "ProblemRoute",
    "method_not_allowed",
    "problem",
]

PROBLEM_MEDIA_TYPE = "application/problem+json"
#: `type` is this followed by the code.
TYPE_PREFIX = "tag:sf-lifecycle,2026:"

#: code -> title. A code not listed here gets its status's reason phrase as title.
TITLES: Mapping[str, str] = {
    # any JSON body (POST /api/feedback, POST /api/session/events)
    "unsupported_media_type": "Body is not UTF-8 JSON",
    "payload_too_large": "Body too large",
    "invalid_json": "Body is not valid JSON",
    "invalid_utf8": "Body is not valid UTF-8",
    "client_disconnected": "Body ended early",
    # POST /api/feedback
    "not_an_object": "Body is not a JSON object",
    "invalid_idempotency_key": "Malformed Idempotency-Key",
    "idempotency_key_reused": "Idempotency-Key reused with another body",
    "in_flight": "Idempotency-Key still being stored",
    "recovering": "Start-up recovery not complete",
    "idempotency_unavailable": "Idempotency index unavailable",
    "queue_closed": "Queue closed",
    # POST /api/feedback, POST /api/session/events
    "disk_write_failed": "Disk refused the write",
    # /api/session/events
    "invalid_session_id": "Malformed session id",
    "invalid_event_id": "Malformed Last-Event-ID",
    "shutting_down": "Replica shutting down",
    "too_many_streams": "Too many open streams",
    "unsafe_state_dir": "State directory unsafe",
    "event_store_unavailable": "Event store unavailable",
    # any route of the library
    "method_not_allowed": "Method not allowed",
}


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    retry_after_s: int | None = None,
    headers: Mapping[str, str] | None = None,
    **extensions: object,
) -> Response:
    """An `application/problem+json` response.

    Args:
        status: The HTTP status (also the body's `status`).
        code: Stable code (snake_case); `type` is built from it.
        detail: What went wrong in this request and how to fix it, for people.
        retry_after_s: Sets `Retry-After` (seconds), e.g. on a 503.
        headers: More headers (`allow` on a 405).
        **extensions: Extension members with this occurrence's facts (`limit`, `errno`).
    """
    body = {
        "type": TYPE_PREFIX + code,
        "title": TITLES.get(code) or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        **extensions,
    }
    all_headers = {"cache-control": "no-store", **(headers or {})}
    if retry_after_s is not None:
        all_headers["retry-after"] = str(retry_after_s)
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(payload, status, headers=all_headers, media_type=PROBLEM_MEDIA_TYPE)


class ProblemRoute(Route):
    """A Starlette `Route` that answers a wrong method with a problem, not plain text.

    Starlette's own 405 is `text/plain` (or whatever the application's exception handler makes
    of it); the library's routes answer in the one shape. `allow` lists every method served on
    the path when several routes share it (Starlette would name only the first route's).
    """

    def __init__(
        self,
        path: str,
        endpoint: Callable[[Request], Awaitable[Response]],
        *,
        methods: list[str],
        allow: list[str] | None = None,
    ) -> None:
        super().__init__(path, endpoint, methods=methods)
        self.allow = ", ".join(
            sorted({m.upper() for m in allow or methods} | (self.methods or set()))
        )

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods and scope["method"] not in self.methods:
            response = method_not_allowed(scope["method"], self.allow)
            await response(scope, receive, send)
        else:
            await super().handle(scope, receive, send)


def method_not_allowed(method: str, allow: str) -> Response:
    """The 405 problem, with `Allow`."""
    use = " or ".join(allow.split(", "))
    return problem(
        405,
        "method_not_allowed",
        f"method {method} not allowed; use {use}",
        headers={"allow": allow},
    )
