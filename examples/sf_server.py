"""Example 1: the example server, a small port of the original sf-server.

Run it the way production does:

    sf-lifecycle serve examples.sf_server:app --port 4000 --state-dir ./state

Routes:

- `/api/healthz`, `/api/ready`, `/api/version`: from `Lifecycle.install`.
- `POST /api/feedback`: a JSON object into the durable queue; 202 with its id once fsynced; drained
  to `<state_dir>/feedback.sqlite3` (or PostgreSQL) in the background and on shutdown.
- `GET /api/session/events?session=ID` streams a session's events (SSE, resumable with
  `Last-Event-ID`); `POST` to the same path publishes one. The events live in Redis when
  `SF_REDIS_URL` is set (`RedisEventLog`, shared by replicas on any host; `/api/ready` then
  checks Redis), else in PostgreSQL when `SF_DATABASE_URL` is set (`PostgresEventLog`), in
  files under the state directory otherwise.
- `GET /api/slow?seconds=S` holds a request in flight (the demo and the tests use it across a
  SIGTERM); `GET /api/hello` is a cheap read.
- `GET /?session=ID` is the live page (`live_page.html`, no external asset): an `EventSource` on
  the session, each event shown with the replica whose stream delivered it, and a button that
  publishes one. It asks its streams for `announce=1`: they then begin with `event: replica`
  (`data:` the replica id), which a page cannot read from the `X-SF-Replica` header.

With `SF_DATABASE_URL=postgresql://...` (the `[postgres]` extra) PostgreSQL holds what replicas
on many hosts share: the drained feedback (`PostgresSink`, table `SF_DATABASE_TABLE`, default
`sf_feedback`), the Idempotency-Key index and (unless `SF_REDIS_URL` is set) the session
events; the state
directory keeps only this replica's write-ahead queue.

Test-only switches:

- `SF_EXAMPLE_SINK_DELAY_MS=N` makes every sink batch take N ms longer, so tests can catch a
  drain in flight.
- `SF_EXAMPLE_FAIL_RATE=R` (0..1) makes `/api/hello` answer 500 for a share R of its requests:
  a bad release for the rollout's demo, tests and benchmark. Every other route, the health
  checks included, keeps working, as with a real regression that Traefik's health check cannot
  see.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sf_lifecycle import (
    ConfigError,
    EventLog,
    FeedbackQueue,
    FileEventLog,
    Lifecycle,
    RedisEventLog,
    Settings,
    Sink,
    SqliteSink,
    feedback_routes,
    session_event_routes,
)

#: Longest `/api/slow` hold, so a typo cannot pin a worker for an hour.
MAX_SLOW_S = 30.0
LIVE_PAGE = (Path(__file__).parent / "live_page.html").read_bytes()
EVENTS_PATH = "/api/session/events"


async def live_page(request: Request) -> Response:
    return HTMLResponse(LIVE_PAGE, headers={"cache-control": "no-store"})


class AnnounceReplica:
    """On a `GET /api/session/events?...&announce=1` stream, send `event: replica` first.

    Pure ASGI: after the response starts (200, an event stream), one SSE message naming the
    replica goes out before the first event. It has no `id:`, so the browser's Last-Event-ID
    is unchanged; other clients (without `announce=1`) see the stream as before.
    """

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.hello = f"event: replica\ndata: {replica}\n\n".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != EVENTS_PATH
            or scope["method"] != "GET"
            or b"announce=1" not in scope.get("query_string", b"").split(b"&")
        ):
            await self.app(scope, receive, send)
            return

        async def announce(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.start" and message["status"] == 200:
                await send({"type": "http.response.body", "body": self.hello, "more_body": True})

        await self.app(scope, receive, announce)


async def slow(request: Request) -> Response:
    raw = request.query_params.get("seconds", "1")
    try:
        seconds = float(raw)
    except ValueError:
        return JSONResponse({"error": f"seconds must be a number, got {raw!r}"}, 400)
    if not 0 <= seconds <= MAX_SLOW_S:
        return JSONResponse({"error": f"seconds must be between 0 and {MAX_SLOW_S:g}"}, 400)
    await asyncio.sleep(seconds)
    return JSONResponse({"slept_s": seconds})


async def hello(request: Request) -> Response:
    return JSONResponse({"hello": "sf"})


def fail_rate(environ: Mapping[str, str] = os.environ) -> float:
    """`SF_EXAMPLE_FAIL_RATE` as a share in [0, 1] (0 when unset).

    Raises:
        ConfigError: not a number in [0, 1]; the message names the variable.
    """
    raw = environ.get("SF_EXAMPLE_FAIL_RATE", "").strip()
    try:
        rate = float(raw) if raw else 0.0
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:  # also NaN
        raise ConfigError(
            "SF_EXAMPLE_FAIL_RATE", raw, "a share of requests between 0 and 1 (e.g. 0.3), or unset"
        )
    return rate


def _failing(rate: float) -> Callable[[Request], Awaitable[Response]]:
    rng = random.Random()

    async def hello_or_500(request: Request) -> Response:
        if rng.random() < rate:
            return JSONResponse({"error": "injected failure (SF_EXAMPLE_FAIL_RATE)"}, 500)
        return await hello(request)

    return hello_or_500


def _delayed(sink: Sink, delay_ms: int) -> Sink:
    async def delayed(records: Sequence[Mapping[str, Any]]) -> None:
        await asyncio.sleep(delay_ms / 1000)
        await sink(records)

    return delayed


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the example app with its own lifecycle (settings from `SF_*` when None)."""
    lifecycle = Lifecycle(settings)
    rate = fail_rate()
    state_dir = lifecycle.settings.require_state_dir()

    queue = FeedbackQueue(state_dir, settings=lifecycle.settings)
    cfg = lifecycle.settings
    sink: Sink
    events: EventLog | None = None
    delay_ms = int(os.environ.get("SF_EXAMPLE_SINK_DELAY_MS", "0") or 0)
    if cfg.database_url:
        from sf_lifecycle.postgres import (
            Database,
            PostgresEventLog,
            PostgresIdempotencyIndex,
            PostgresSink,
        )

        db = Database(cfg.database_url)
        sink = PostgresSink(db, table=cfg.database_table)
        PostgresIdempotencyIndex.for_queue(queue, db)  # shared by every replica
        pg_events = PostgresEventLog.from_settings(cfg, db)
        if not cfg.redis_url:  # with both set, Redis serves the events
            events = pg_events

        async def close_postgres() -> None:
            await pg_events.aclose()
            await db.close()

        # After the final drain, without a shutdown hook of its own (a hook after the drain
        # would halve the drain's share of the grace budget).
        closing: set[asyncio.Task[None]] = set()
        queue.on_close(
            lambda: closing.add(asyncio.get_running_loop().create_task(close_postgres()))
        )
    else:
        sink = SqliteSink(
            state_dir / "feedback.sqlite3", file_mode=cfg.file_mode, dir_mode=cfg.dir_mode
        )
    queue.install(lifecycle, _delayed(sink, delay_ms) if delay_ms > 0 else sink)
    if cfg.redis_url:
        redis_log = RedisEventLog.from_settings(cfg)
        lifecycle.add_readiness_check("redis", redis_log.ping, timeout_s=1.0)
        lifecycle.on_shutdown("redis", lambda deadline: redis_log.aclose())
        events = redis_log
    elif events is None:
        events = FileEventLog.from_settings(cfg)

    app = Starlette(
        routes=[
            Route("/", live_page),
            Route("/api/slow", slow),
            Route("/api/hello", _failing(rate) if rate > 0 else hello),
            *feedback_routes(queue, lifecycle),
            *session_event_routes(lifecycle, events),
        ]
    )
    app.add_middleware(AnnounceReplica, replica=cfg.replica_id or "unnamed replica")
    return lifecycle.install(app)


app = create_app()
