"""An app for the multi-host tests: its own queue in its state dir, a sink shared by replicas.

    REPLICA_APP_SINK_DB=/shared/feedback.sqlite3 \
        sf-lifecycle serve tests.integration.replica_app:app --state-dir ./state-a

- `REPLICA_APP_SINK_DB`: the sink every replica delivers into, outside any replica's state
  directory, as the PostgreSQL database is on many hosts. `SF_STATE_DIR` then holds only this
  replica's write-ahead queue (and its idempotency index), like a pod's own volume.
- `SF_DATABASE_URL` instead: the PostgreSQL sink and idempotency index, as the example server
  uses them.

`sf-lifecycle queue recover --state-dir DIR --app tests.integration.replica_app:app` builds the
same sink from the same variables, which is what the scale-down recovery Job does with the
example server and `SF_DATABASE_URL`.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.applications import Starlette

from sf_lifecycle import FeedbackQueue, Lifecycle, SqliteSink, feedback_routes


def create_app() -> Starlette:
    lifecycle = Lifecycle()
    state_dir = lifecycle.settings.require_state_dir()
    queue = FeedbackQueue(state_dir, settings=lifecycle.settings)
    if lifecycle.settings.database_url:
        from sf_lifecycle.postgres import Database, PostgresIdempotencyIndex, PostgresSink

        db = Database(lifecycle.settings.database_url)
        PostgresIdempotencyIndex.for_queue(queue, db)
        queue.install(lifecycle, PostgresSink(db))
        return lifecycle.install(Starlette(routes=feedback_routes(queue, lifecycle)))
    shared = Path(os.environ["REPLICA_APP_SINK_DB"])
    if shared.is_relative_to(state_dir.resolve()) or shared.is_relative_to(state_dir):
        raise ValueError(f"REPLICA_APP_SINK_DB={shared} is inside the state dir {state_dir}")
    queue.install(lifecycle, SqliteSink(shared))
    return lifecycle.install(Starlette(routes=feedback_routes(queue, lifecycle)))


app = create_app()
