"""`POST /api/feedback`: accept a JSON object, answer 202 only once it is durable.

Status codes; every error is a problem (`application/problem+json`, RFC 9457) whose `code`
is given here (README.md, "Errors", lists them all)::

    202  {"id": ...}          stored durably (fsynced); a retry with the same Idempotency-Key
                              gets the same id and header `Idempotent-Replayed: true`
    400  invalid JSON (NaN/Infinity and duplicate keys too: `invalid_json`), invalid UTF-8
         (`invalid_utf8`), not an object (`not_an_object`), malformed Idempotency-Key
         (`invalid_idempotency_key`), body ended early (`client_disconnected`)
    405  another method than POST (`method_not_allowed`)
    409  the same Idempotency-Key is still being stored by an earlier request (`in_flight`)
    413  body over `feedback_max_bytes`, checked against Content-Length, then while reading
         (`payload_too_large`, with `limit`)
    415  not `application/json` (or `application/*+json`), or a charset other than UTF-8
         (`unsupported_media_type`)
    422  the same Idempotency-Key came with a different body (`idempotency_key_reused`)
    503  the disk refused the write (ENOSPC, EIO...: `disk_write_failed`, with `errno`), the
         queue is closed (`queue_closed`), the idempotency index cannot be read
         (`idempotency_unavailable`; `/api/ready` is 503 meanwhile; a damaged index is
         quarantined and rebuilt empty instead), or the key cannot be checked yet
         (`recovering`: start-up recovery has not succeeded yet: running, or failed and being
         retried); nothing was acknowledged

Idempotency keys live in three places (see `idempotency`): in memory while this process holds
the record, inside the record itself (so a crash cannot separate them), and in `<state_dir>/
feedback/idempotency.sqlite3`, written by the drain after the sink committed the record and
before its segment is removed. A retry after a restart therefore finds the key either in a
segment that recovery is re-delivering (keyed requests get 503 until recovery succeeded), in a
file another process holds (its keys are read and kept until the file is gone:
`FeedbackQueue.held_key`), or in the index.
Across two live replicas the index catches a retry once the first record was drained (within
`drain_interval_ms`), or, when that replica died first, once a peer's orphan sweep delivered it
(within `orphan_sweep_ms`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import sqlite3
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from ._config import Settings
from ._errors import DiskWriteError, QueueError
from ._ids import new_record_id
from ._jsonbody import BodyError, check_json_content_type, read_json_body
from ._lifecycle import Lifecycle
from ._problem import ProblemRoute, problem
from ._queue import FeedbackQueue
from .idempotency import KeyIndex

__all__ = ["feedback_routes"]

logger = logging.getLogger("sf_lifecycle.feedback")

_KEY_RE = re.compile(r"[A-Za-z0-9._:~+/=-]{1,128}\Z")


class _Recovering(Exception):
    """Start-up recovery has not succeeded yet: a key this process does not hold is unknown."""


class _FeedbackEndpoint:
    def __init__(self, queue: FeedbackQueue, settings: Settings, index: KeyIndex):
        self.queue = queue
        self.max_bytes = settings.feedback_max_bytes
        self.index = index

    async def handle(self, request: Request) -> Response:
        try:
            check_json_content_type(request)
        except BodyError as exc:
            return exc.response()
        key = request.headers.get("idempotency-key")
        if key is not None and not _KEY_RE.match(key):
            return problem(
                400,
                "invalid_idempotency_key",
                "Idempotency-Key must be 1-128 characters from A-Z a-z 0-9 . _ : ~ + / = -",
            )
        try:
            body = await read_json_body(request, self.max_bytes)
        except BodyError as exc:
            return exc.response()
        if not isinstance(body, dict):
            return problem(
                400, "not_an_object", f"body must be a JSON object, got {type(body).__name__}"
            )
        if key is None:
            return await self._store(body, None)
        return await self._store_once(key, body)

    async def _store_once(self, key: str, body: dict[str, Any]) -> Response:
        sha = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        ).hexdigest()
        rid = new_record_id()  # before the claim: a takeover knows which id may exist
        try:
            known = await self.index.claim(key, sha, held=self._held, record_id=rid)
        except _Recovering:
            return problem(
                503,
                "recovering",
                "start-up recovery has not completed yet, so this key cannot be checked; "
                "retry shortly",
                retry_after_s=1,
            )
        except (sqlite3.Error, OSError) as exc:
            # Never a 500, never a path in the body: the key cannot be checked right now.
            logger.error("idempotency index %s unreadable: %s", self.index.describe(), exc)
            return problem(
                503,
                "idempotency_unavailable",
                "the idempotency index cannot be read, so this key cannot be checked; "
                "nothing was stored",
                retry_after_s=1,
            )
        if known is None:  # claimed: ours to store, then settle or release
            return await self._store(body, key, sha, rid)
        if known.claimed and known.id is not None:
            # Taken over from a replica that died holding it: store under the id it may have
            # stored already, so the sink keeps one record (ARCHITECTURE.md, "Idempotency").
            return await self._store(body, key, sha, known.id)
        if known.sha != sha:
            return problem(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different body",
            )
        if known.id is None:
            return problem(
                409, "in_flight", "a request with this Idempotency-Key is still being stored"
            )
        self.queue.idempotent_replays += 1
        return JSONResponse({"id": known.id}, 202, headers={"idempotent-replayed": "true"})

    def _held(self, key: str) -> tuple[str, str] | None:
        """A key this process does not hold: in another process's undelivered file, or
        unknowable while recovery re-delivers the orphans that may carry it."""
        if self.queue.recovering:
            raise _Recovering
        return self.queue.held_key(key)

    async def _store(
        self, body: dict[str, Any], key: str | None, sha: str = "", rid: str | None = None
    ) -> Response:
        """Append `body` (as `rid` when given); with a `key` (claimed by the caller), settle
        or release it."""
        try:
            rid = await self.queue.append(
                body, meta=None if key is None else {"key": key, "sha": sha}, record_id=rid
            )
        except BaseException as exc:
            if key is not None:
                self.index.release(key)
            if isinstance(exc, DiskWriteError):
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                return problem(
                    503,
                    "disk_write_failed",
                    f"the record was not stored: {reason}; retry later",
                    retry_after_s=1,
                    errno=errno_name(exc.errno),
                )
            if isinstance(exc, QueueError):
                return problem(503, "queue_closed", str(exc), retry_after_s=1)
            raise
        if key is not None:
            self.index.settle(key, rid)
        return JSONResponse({"id": rid}, 202)


def errno_name(code: int | None) -> str | None:
    """`ENOSPC` for 28: the symbolic name a client can act on."""
    return None if code is None else errno.errorcode.get(code, str(code))


def feedback_routes(
    queue: FeedbackQueue,
    lifecycle_or_settings: Lifecycle | Settings,
    *,
    path: str = "/api/feedback",
    index: KeyIndex | None = None,
) -> list[BaseRoute]:
    """The `POST /api/feedback` route, storing into `queue`.

    Only builds the route: it creates no index and registers nothing. The index is `index`, or
    the one the queue's wiring made (`queue.install(lifecycle)` puts one in
    `<state_dir>/feedback/` and reports it in `/api/ready` as `idempotency-index`).

    Args:
        queue: The durable queue (install it on the lifecycle so it drains).
        lifecycle_or_settings: Source of `feedback_max_bytes`.
        path: Where to mount the route.
        index: Idempotency index (`IdempotencyIndex.for_queue(queue)` makes one that records
            the queue's deliveries); `queue.idempotency` when None.

    Raises:
        ValueError: no index given and the queue is not installed (so it has none); the
            message says what to do.
    """
    settings = (
        lifecycle_or_settings.settings
        if isinstance(lifecycle_or_settings, Lifecycle)
        else lifecycle_or_settings
    )
    chosen = index if index is not None else queue.idempotency
    if chosen is None:
        raise ValueError(
            "feedback_routes: the queue has no idempotency index yet; call "
            "queue.install(lifecycle) before feedback_routes(queue, ...), or pass "
            "index=IdempotencyIndex.for_queue(queue) "
            "(from sf_lifecycle.idempotency import IdempotencyIndex)"
        )
    endpoint = _FeedbackEndpoint(queue, settings, chosen)
    return [ProblemRoute(path, endpoint.handle, methods=["POST"])]
