"""Reading a JSON request body the strict way, shared by every endpoint that accepts one.

Strict because a queue keeps what it accepts: NaN and Infinity (not JSON, and not portable to
most sinks), duplicate keys (which one wins differs between parsers), invalid UTF-8 and a body
over the limit are refused with a 4xx naming the problem. The limit is enforced while reading,
so a client without a `Content-Length` cannot make the server buffer more than the limit.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

__all__ = ["BodyError", "read_json_body"]

_JSON_TYPE = re.compile(r"application/(?:[a-z0-9.+-]+\+)?json\Z")
_CHARSET = re.compile(r"charset\s*=\s*\"?([^\";\s]+)", re.IGNORECASE)


class BodyError(Exception):
    """Why a body was refused: the status, a stable code for programs, a sentence for people."""

    def __init__(self, status: int, error: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.extra = extra

    def response(self) -> JSONResponse:
        body = {"error": self.error, "detail": self.detail, **self.extra}
        return JSONResponse(body, self.status, headers={"cache-control": "no-store"})


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def check_json_content_type(request: Request) -> None:
    """Raise a 415 `BodyError` unless the body is declared as UTF-8 JSON (`application/*+json`)."""
    ctype = request.headers.get("content-type", "")
    media, _, params = ctype.partition(";")
    charset = _CHARSET.search(params)
    if not _JSON_TYPE.match(media.strip().lower()) or (
        charset is not None and charset.group(1).lower() not in ("utf-8", "utf8")
    ):
        raise BodyError(
            415,
            "unsupported_media_type",
            f"send content-type: application/json (UTF-8), got {ctype or 'none'!r}",
        )


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The request's JSON body; `BodyError` (415, 413 or 400) saying why not.

    Args:
        request: The request; its content type is checked first.
        max_bytes: Largest body accepted, counted as the bytes arrive.
    """
    check_json_content_type(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyError(
            413,
            "payload_too_large",
            f"body of {declared} bytes is over the limit of {max_bytes} bytes",
            limit=max_bytes,
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise BodyError(
                    413,
                    "payload_too_large",
                    f"body is over the limit of {max_bytes} bytes",
                    limit=max_bytes,
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise BodyError(400, "client_disconnected", "the body ended early") from None
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(
            400, "invalid_utf8", f"body is not valid UTF-8 at byte {exc.start}"
        ) from None
    try:
        return json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise BodyError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
