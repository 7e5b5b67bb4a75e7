"""Session event streams over SSE: replay from `Last-Event-ID`, then live, until closing.

`session_event_routes(lifecycle, log)` gives two Starlette routes on `/api/session/events`:

* `GET ?session=ID` streams the session's events (`text/event-stream`). The position comes from
  the `Last-Event-ID` header (what browsers send on reconnect) or, failing that, the
  `last_event_id` query parameter (for clients that cannot set headers on a first connect).
* `POST ?session=ID` with a JSON body appends an event and answers `{"id": ...}`.

Deliberate choices:

* **Streams end at `begin_closing()`, not at SIGTERM.** During the drain delay the proxy still
  routes sticky clients here, so streams keep flowing. When the delay is over the runner closes
  the listeners and calls `state.begin_closing()`: each stream then sends `retry: <ms>` and ends,
  so uvicorn has no open response to wait for, and the client reconnects (to the new replica,
  since the proxy dropped this one) with its `Last-Event-ID`.
* **sse-starlette's own shutdown detection is switched off.** It patches uvicorn at import and
  polls the SIGTERM handler's `should_exit`, which would cut streams at the start of the drain
  (or race our farewell). `_LifecycleEventSourceResponse` replaces that watcher with
  `state.wait_closing()`, after which the stream has `close_grace_s` to send its `retry:` before
  it is cancelled.
* **Streams are counted in `state.streams`, not `in_flight`** (the middleware skips this path),
  so an open stream never looks like a request that hangs (`in_flight_ages_s`, which
  `sf-lifecycle rollout` reads); `/api/healthz` shows the count. Over
  `sse_max_streams` a new stream gets 503 with `Retry-After`.
* **A store that cannot be reached is a 503, and a stream that ends.** A publish that the event
  store refuses (`DiskWriteError`, `EventStoreUnavailable`: Redis down) answers 503 problem+json
  with `Retry-After`; an open stream whose store fails ends with the same `retry:` hint as at
  closing, and the client resumes from its `Last-Event-ID` once the store is back.
* **An event is encoded once, a batch sent at once.** Each stream follows its session with
  `follow_batches` (over `FileEventLog`: one watcher per session per process, which reads the
  file once for every stream); the SSE frame of an event is encoded once per process
  (`_Frames`, at most `FRAMES_CACHE_BYTES`) and shared by every stream that sends it, and a
  stream that is behind sends up to `MAX_BATCH` events in one write instead of one write
  each, but never more than `MAX_WRITE_BYTES` (64 KiB, or one event if larger) per write: the
  send timeout is per write, and must cut only a client that accepts nothing, not a slow one.
* **The publish body is checked while it is read**: the size limit applies to the bytes received,
  not to a `Content-Length` the client may not send.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.types import Message, Receive, Scope, Send

from ._errors import DiskWriteError, EventStoreUnavailable, UnsafePath
from ._events import (
    LOST,
    Event,
    EventLog,
    InvalidEventId,
    InvalidSessionId,
    follow_batches,
    parse_event_id,
)
from ._events import validate_session_id as _validate_session
from ._jsonbody import BodyError, read_json_body
from ._lifecycle import Lifecycle
from ._problem import ProblemRoute, problem
from ._state import ShutdownState

__all__ = ["EVENTS_PATH", "session_event_routes"]

logger = logging.getLogger("sf_lifecycle.sse")

EVENTS_PATH = "/api/session/events"
_NO_STORE = {"cache-control": "no-store"}


class _LifecycleEventSourceResponse(EventSourceResponse):
    """`EventSourceResponse` whose shutdown comes from our `ShutdownState`, and that counts."""

    def __init__(
        self,
        content: AsyncIterator[bytes | ServerSentEvent],
        *,
        state: ShutdownState,
        close_grace_s: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self._sf_state = state
        self._close_grace_s = close_grace_s

    async def _listen_for_exit_signal_with_grace(self) -> None:
        # Replaces sse-starlette's AppStatus / uvicorn-introspection watcher (see module doc).
        await self._sf_state.wait_closing()
        # The stream's generator sees the same signal and ends with `retry:`, which cancels
        # this task; if it has not managed within the grace (a client that stopped reading),
        # returning here cancels the response.
        await asyncio.sleep(self._close_grace_s)

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        # Same rule as sse-starlette's (one send that takes longer than `send_timeout` ends the
        # stream with `SendTimeoutError`), with asyncio's timeout instead of an anyio cancel
        # scope: measured, the scope cost as much as the rest of a delivery.
        if self.send_timeout is None:
            await send(message)
            return
        try:
            async with asyncio.timeout(self.send_timeout):
                await send(message)
        except TimeoutError:
            raise SendTimeoutError() from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._sf_state.streams -= 1


class _Closing:
    """The replica's closing as the `Flag` that ends `follow()`."""

    def __init__(self, state: ShutdownState) -> None:
        self._state = state

    def is_set(self) -> bool:
        return self._state.closing

    async def wait(self) -> None:
        await self._state.wait_closing()


#: Most bytes a stream that is behind joins into one write. A send that times out must mean
#: "the client accepts nothing": a slow but steady client drains 64 KiB well within the send
#: timeout, where a batch of 64 large events (12.8 MB at 200 KB each) would not.
MAX_WRITE_BYTES = 64 * 1024
#: Most bytes of encoded frames a process keeps for reuse (least recently used go first).
FRAMES_CACHE_BYTES = 8 * 1024 * 1024


class _Frames:
    """SSE frames of recent events, encoded once and shared by every stream that sends them.

    Bounded by bytes (`max_bytes`, least recently used dropped first), not by count: 4,096
    frames of 60 KB events were 240 MB kept after retention had dropped them. Keyed by session
    and id, never by the data (the key would keep the event's string alive); the event's
    timestamp and data length are checked on a hit, so an id reused by a re-created log is not
    answered with another event's bytes. `lost` events are per client and never cached.
    """

    def __init__(self, max_bytes: int = FRAMES_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._cache: collections.OrderedDict[tuple[str, str], tuple[int, int, bytes]] = (
            collections.OrderedDict()
        )

    def get(self, session: str, event: Event) -> bytes:
        if event.kind == LOST or event.id is None:
            return _encode(event)
        key = (session, event.id)
        cache = self._cache
        hit = cache.get(key)
        if hit is not None and hit[0] == event.ts_ms and hit[1] == len(event.data_json):
            cache.move_to_end(key)
            return hit[2]
        frame = _encode(event)
        if hit is not None:
            del cache[key]
            self.nbytes -= len(hit[2])
        if len(frame) <= self.max_bytes // 8:  # one huge event must not flush every other
            while cache and self.nbytes + len(frame) > self.max_bytes:
                _, (_, _, old) = cache.popitem(last=False)
                self.nbytes -= len(old)
            cache[key] = (event.ts_ms, len(event.data_json), frame)
            self.nbytes += len(frame)
        return frame


def _writes(frames: list[bytes], max_bytes: int = MAX_WRITE_BYTES) -> Iterator[bytes]:
    """`frames` joined into writes of at most `max_bytes` (or one frame, if larger)."""
    start, size = 0, 0
    for i, frame in enumerate(frames):
        if size and size + len(frame) > max_bytes:
            yield frames[start] if i - start == 1 else b"".join(frames[start:i])
            start, size = i, 0
        size += len(frame)
    yield frames[start] if len(frames) - start == 1 else b"".join(frames[start:])


def _encode(event: Event) -> bytes:
    return ServerSentEvent(
        data=event.data_json, id=event.id, event=LOST if event.kind == LOST else None
    ).encode()


class _Endpoints:
    def __init__(
        self,
        lifecycle: Lifecycle,
        log: EventLog,
        max_body_bytes: int,
        send_timeout_s: float | None,
        close_grace_s: float,
    ) -> None:
        self.lifecycle = lifecycle
        self.state = lifecycle.state
        self.log = log
        self.max_body_bytes = max_body_bytes
        self.send_timeout_s = send_timeout_s
        self.close_grace_s = close_grace_s
        self.frames = _Frames()

    def _retry_after_s(self) -> int:
        return max(1, math.ceil(self.lifecycle.settings.sse_retry_ms / 1000))

    async def stream(self, request: Request) -> Response:
        settings = self.lifecycle.settings
        session = request.query_params.get("session", "")
        try:
            _validate_session(session)
        except InvalidSessionId as exc:
            return problem(400, "invalid_session_id", str(exc))
        last_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        if last_id is not None:
            last_id = last_id.strip() or None
        if last_id is not None:
            try:
                parse_event_id(last_id)
            except InvalidEventId as exc:
                return problem(400, "invalid_event_id", str(exc))
        state = self.state
        if state.closing:
            return problem(
                503,
                "shutting_down",
                "replica is shutting down; reconnect",
                retry_after_s=self._retry_after_s(),
            )
        if state.streams >= settings.sse_max_streams:
            logger.warning("stream limit reached (%d open); answering 503", state.streams)
            return problem(
                503,
                "too_many_streams",
                f"too many open streams on this replica (limit {settings.sse_max_streams})",
                retry_after_s=self._retry_after_s(),
                limit=settings.sse_max_streams,
            )
        # Counted here, with no await since the check; the response's __call__ uncounts it.
        state.streams += 1
        stats = self.lifecycle.stats
        stats.streams_opened += 1
        if last_id is not None:
            stats.stream_resumes += 1
        return _LifecycleEventSourceResponse(
            self._events(session, last_id),
            state=state,
            close_grace_s=self.close_grace_s,
            ping=settings.sse_ping_ms / 1000,
            send_timeout=self.send_timeout_s,
            headers=_NO_STORE,
        )

    async def _events(
        self, session: str, cursor: str | None
    ) -> AsyncIterator[bytes | ServerSentEvent]:
        batches = follow_batches(self.log, session, cursor, until=_Closing(self.state))
        frame = self.frames.get
        stats = self.lifecycle.stats
        async with contextlib.aclosing(batches):
            try:
                async for batch in batches:
                    stats.events_sent += len(batch)
                    if batch[0].kind == LOST:  # a lost event only ever leads a batch
                        stats.lost_events += 1
                    if len(batch) == 1:
                        yield frame(session, batch[0])
                    else:
                        for chunk in _writes([frame(session, event) for event in batch]):
                            yield chunk
            except UnsafePath as exc:  # the client retries; an operator must fix the folder
                logger.error("session %s: stream ended: %s", session, exc)
            except EventStoreUnavailable as exc:  # Redis down: the client resumes once it is back
                logger.warning("session %s: stream ended: %s", session, exc)
        # Closing: tell the client how soon to come back, then end the response cleanly.
        yield ServerSentEvent(
            comment="replica closing; reconnect with Last-Event-ID",
            retry=self.lifecycle.settings.sse_retry_ms,
        )

    async def publish(self, request: Request) -> Response:
        session = request.query_params.get("session", "")
        try:
            _validate_session(session)
        except InvalidSessionId as exc:
            return problem(400, "invalid_session_id", str(exc))
        try:
            data = await read_json_body(request, self.max_body_bytes)
        except BodyError as exc:  # a client that went away mid-body too
            return exc.response()
        try:
            event_id = await self.log.append(session, data)
        except UnsafePath as exc:
            logger.error("session %s: event not stored: %s", session, exc)
            return problem(
                503,
                "unsafe_state_dir",
                f"event not stored: the state directory is unsafe ({exc.strerror}); "
                "an operator must fix it",
                retry_after_s=self._retry_after_s(),
            )
        except DiskWriteError as exc:
            logger.error("session %s: event not stored: %s", session, exc)
            return problem(
                503,
                "disk_write_failed",
                "event not stored (disk error); retry later",
                retry_after_s=self._retry_after_s(),
            )
        except EventStoreUnavailable as exc:
            logger.error("session %s: event not stored: %s", session, exc)
            return problem(
                503,
                "event_store_unavailable",
                "event not stored: the event store cannot be reached; retry later",
                retry_after_s=self._retry_after_s(),
            )
        return JSONResponse({"id": event_id, "session": session}, 201, headers=_NO_STORE)


def session_event_routes(
    lifecycle: Lifecycle,
    log: EventLog,
    *,
    path: str = EVENTS_PATH,
    max_body_bytes: int | None = None,
    send_timeout_s: float | None = 30.0,
    close_grace_s: float = 1.0,
) -> list[BaseRoute]:
    """Routes for `GET` (stream) and `POST` (publish) on `path`.

    Args:
        lifecycle: Supplies the settings (`sse_*`, `feedback_max_bytes`) and the shutdown state.
        log: Where events are stored; `FileEventLog` or any `EventLog`.
        path: Keep the default unless you also pass it to the middleware's `exclude_paths`:
            a stream counted as in flight would look like a request that never ends.
        max_body_bytes: Largest publish body; `settings.feedback_max_bytes` when None.
        send_timeout_s: A client that takes longer to accept one write (at most 64 KiB, or one
            event if larger) is disconnected.
        close_grace_s: After closing begins, how long a stream may take to send its `retry:`.
    """
    limit = lifecycle.settings.feedback_max_bytes if max_body_bytes is None else max_body_bytes
    ep = _Endpoints(lifecycle, log, limit, send_timeout_s, close_grace_s)
    allow = ["GET", "HEAD", "POST"]
    return [
        ProblemRoute(path, ep.stream, methods=["GET"], allow=allow),
        ProblemRoute(path, ep.publish, methods=["POST"], allow=allow),
    ]
