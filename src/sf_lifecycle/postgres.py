"""PostgreSQL backends, for replicas on many hosts that share no filesystem.

Install the extra (`pip install 'sf-lifecycle[postgres]'`: psycopg 3 and psycopg-pool); without
it, importing this module raises an `ImportError` that names it. The core never imports it.

One `Database` (a bounded pool) per process serves the three backends:

- `PostgresSink`: the queue's sink (drained records, one transaction per batch, idempotent
  by record id);
- `PostgresIdempotencyIndex`: the `Idempotency-Key` index every replica shares
  (`PostgresIdempotencyIndex.for_queue(queue, db)` before `queue.install`);
- `PostgresEventLog`: session events, an `EventLog` for `session_event_routes`.

Each replica still acknowledges writes to its own local write-ahead queue (`SF_STATE_DIR`), so
PostgreSQL being down delays delivery, it does not refuse unkeyed writes.
"""

from ._pg import require_driver

require_driver()

from ._errors import BackendUnavailable  # noqa: E402
from ._pg import Database  # noqa: E402
from ._pg_events import PostgresEventLog  # noqa: E402
from ._pg_idempotency import PostgresIdempotencyIndex  # noqa: E402
from ._pg_sink import PostgresSink  # noqa: E402

__all__ = [
    "BackendUnavailable",
    "Database",
    "PostgresEventLog",
    "PostgresIdempotencyIndex",
    "PostgresSink",
]
