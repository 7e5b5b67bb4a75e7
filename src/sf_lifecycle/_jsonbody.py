"""Reading a JSON request body the strict way, shared by every endpoint that accepts one.

Strict because a queue keeps what it accepts: NaN and Infinity (not JSON, and not portable to
most sinks), duplicate keys (which one wins differs between parsers), invalid UTF-8 and a body
over the limit are refused with a 4xx naming the problem. The limit is enforced while reading,
so a client without a `Content-Length` cannot make the server buffer more than the limit.

The edges, each a 400 (never a 500 from a later step that cannot store the value):

* numbers must fit a double: `1e400` would become infinity, which no strict encoder writes back;
  `1e-400` underflows to 0.0 and is accepted (rounding, as for any decimal fraction);
* integers have at most 4,300 digits (Python's own conversion limit);
* strings must be valid Unicode: an escaped lone surrogate (`"\ud800"`) cannot be encoded as
  UTF-8 by the queue, the sink or the event log;
* nesting is at most `MAX_DEPTH` (64) arrays and objects deep, checked before parsing, so a
  body of 5,000 `[` is refused in linear time instead of exhausting the parser's recursion;
* a byte order mark is refused (RFC 8259: senders must not add one).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ._problem import problem

__all__ = ["MAX_DEPTH", "BodyError", "read_json_body"]

#: Deepest nesting of arrays and objects accepted in a body.
MAX_DEPTH = 64
#: Most digits in an integer (Python's `int` conversion limit, `sys.get_int_max_str_digits`).
MAX_INT_DIGITS = 4300
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_SURROGATE = re.compile("[\ud800-\udfff]")

_JSON_TYPE = re.compile(r"application/(?:[a-z0-9.+-]+\+)?json\Z")
_CHARSET = re.compile(r"charset\s*=\s*\"?([^\";\s]+)", re.IGNORECASE)


class BodyError(Exception):
    """Why a body was refused: the status, a stable code for programs, a sentence for people.

    Internal to the HTTP layer (never reaches a caller of the library): `response()` turns it
    into the problem the endpoint answers.
    """

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra

    def response(self) -> Response:
        return problem(self.status, self.code, self.detail, **self.extra)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range for a double")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"integer of {digits} digits (at most {MAX_INT_DIGITS} digits)")
    return int(text)


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than `MAX_DEPTH` without parsing (brackets in strings skipped)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return  # cannot be deeper: the common case costs two C-speed counts
    depth = 0
    for m in _TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ValueError(f"nested more than {MAX_DEPTH} arrays/objects deep")
        elif c in "]}":
            depth -= 1


def _check_strings(value: Any) -> None:
    """Refuse a lone surrogate (an escape like `\\ud800` that no UTF-8 encoder can write)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise ValueError(f"string {v[:20]!r} holds a lone surrogate (invalid Unicode)")
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


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
    if text.startswith("\ufeff"):
        raise BodyError(400, "invalid_json", "body starts with a BOM; send UTF-8 without one")
    try:
        _check_depth(text)
        value = json.loads(
            text,
            parse_constant=_no_constants,
            parse_float=_finite,
            parse_int=_bounded_int,
            object_pairs_hook=_no_duplicates,
        )
        if "\\u" in text:  # a lone surrogate can only come from an escape
            _check_strings(value)
    except (ValueError, RecursionError) as exc:
        raise BodyError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    return value
