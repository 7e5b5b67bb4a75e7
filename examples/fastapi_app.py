"""Example 2: a FastAPI app with sf-lifecycle: health routes, drain, durable feedback, SSE.

    sf-lifecycle serve examples.fastapi_app:app --port 4000 --state-dir ./state

or under plain uvicorn (logs: see README, "Logs"):

    SF_STATE_DIR=./state uvicorn examples.fastapi_app:app --port 4000

`Lifecycle.install` adds the middleware that answers `/api/healthz`, `/api/ready` and
`/api/version` (under `SF_HEALTH_PREFIX`) and the drain; `feedback_routes` and
`session_event_routes` are Starlette routes, which a FastAPI router takes as they are. The health
routes are served by the middleware, not by FastAPI's router, so they are not in `/openapi.json`
(deliberately: they are the operator's, not the API's). `tests/unit/test_fastapi_example.py`
tests it through `httpx.ASGITransport` with `sf_lifecycle.testing.started(app)`.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from sf_lifecycle import (
    FeedbackQueue,
    FileEventLog,
    Lifecycle,
    Settings,
    feedback_routes,
    session_event_routes,
)


class Greeting(BaseModel):
    message: str
    replica: str | None


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; settings from `SF_*` variables when None (`SF_STATE_DIR` is required)."""
    lifecycle = Lifecycle(settings)
    state_dir = lifecycle.settings.require_state_dir()
    queue = FeedbackQueue(state_dir, settings=lifecycle.settings)
    queue.install(lifecycle)  # SQLite sink at <state_dir>/feedback.sqlite3
    events = FileEventLog.from_settings(lifecycle.settings)

    app = FastAPI(title="sf-lifecycle FastAPI example")

    @app.get("/api/hello")
    async def hello() -> Greeting:
        return Greeting(message="hello", replica=lifecycle.settings.replica_id)

    # Starlette routes, appended to FastAPI's router (they stay out of the OpenAPI schema too).
    app.router.routes.extend(
        [*feedback_routes(queue, lifecycle), *session_event_routes(lifecycle, events)]
    )
    return lifecycle.install(app)


app = create_app()
