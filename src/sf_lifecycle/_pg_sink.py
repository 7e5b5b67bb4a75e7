"""`PostgresSink`: drained feedback into a PostgreSQL table, one transaction per batch.

The same contract as `SqliteSink` (`_sink.Sink`): a batch is committed when the call returns,
and a redelivered record is a no-op (`ON CONFLICT (id) DO NOTHING`), so the queue's
at-least-once delivery stays effectively-once in the table.

A batch is one transaction: `COPY` into a temporary staging table (`ON COMMIT DROP`, so it
also works behind a pooler in transaction mode), then one `INSERT ... SELECT ... ON CONFLICT
(id) DO NOTHING`. Measured here, COPY beat sending the columns as four arrays to `unnest`
about 3x at 1,000 records; `benchmarks/bench_postgres.py` compares the sink with one `INSERT`
per record. The table is created when missing, under an advisory lock so replicas starting
together do not race.

A record PostgreSQL can never store (jsonb refuses `\\u0000`; any data exception, SQLSTATE
class 22: the value itself is refused) must not block the records behind it: when a batch
fails so, it is stored again record by record (each its own transaction), the good ones
committed, and `RecordsRejected` names the others with the error class and SQLSTATE (never the
server's message, which can quote the body). The queue quarantines them and goes on.

An integrity violation (class 23: a foreign key, unique or check constraint an operator added)
depends on other rows and may clear later (the parent row arrives), so it is not a rejection:
the batch fails and is retried with backoff like any sink failure, and the drainer's `error`
names the SQLSTATE. A duplicate `id` never gets there (`ON CONFLICT (id) DO NOTHING`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from . import _crashpoints as _cp
from ._errors import RecordsRejected
from ._pg import Database, check_identifier

__all__ = ["PostgresSink"]


class PostgresSink:
    """Records into `table` (`id` primary key, `idem_key`, `body` jsonb, `created_at`).

    Args:
        db: The process's pool (`sf_lifecycle.postgres.Database`).
        table: Table name (a plain identifier; created when missing).
        timeout_s: Longest one batch may take on the client's clock; a hung server makes
            the call raise `BackendUnavailable` then (None: the pool's statement timeout
            plus its connect timeout, so a big batch is never cut short while the server
            works).

    Raises (from a call):
        BackendUnavailable: the server did not answer or failed; nothing was committed and
            the batch stays queued (the drainer retries it).
        RecordsRejected: the batch is committed but for these records, which the table can
            never hold (a data exception, SQLSTATE class 22); the queue quarantines them.
            An integrity violation (class 23) propagates instead: it may clear later.
    """

    def __init__(
        self, db: Database, *, table: str = "sf_feedback", timeout_s: float | None = None
    ) -> None:
        from psycopg import sql

        self.db = db
        self.timeout_s = (
            timeout_s
            if timeout_s is not None
            else db.statement_timeout_ms / 1000 + db.connect_timeout_s
        )
        self.table = check_identifier(table, "table")
        name = sql.Identifier(self.table)
        self._create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, idem_key text, "
            "body jsonb NOT NULL, created_at timestamptz NOT NULL, "
            "delivered_at timestamptz NOT NULL DEFAULT now())"
        ).format(name)
        self._stage = sql.SQL(
            "CREATE TEMP TABLE sf_stage (id text, idem_key text, body jsonb, ts bigint) "
            "ON COMMIT DROP"
        )
        self._copy = sql.SQL("COPY sf_stage (id, idem_key, body, ts) FROM STDIN")
        self._insert = sql.SQL(
            "INSERT INTO {} (id, idem_key, body, created_at) "
            "SELECT id, idem_key, body, to_timestamp(ts / 1000.0) FROM sf_stage "
            "ON CONFLICT (id) DO NOTHING"
        ).format(name)
        self._insert_one = sql.SQL(
            "INSERT INTO {} (id, idem_key, body, created_at) "
            "VALUES (%s, %s, %s::jsonb, to_timestamp(%s / 1000.0)) ON CONFLICT (id) DO NOTHING"
        ).format(name)

    async def _ensure(self) -> None:
        async def create(conn: Any) -> None:
            await conn.execute(self._create)

        await self.db.ensure(f"sink:{self.table}", create)

    async def __call__(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Commit `records` in one transaction (ids already stored are ignored)."""
        if not records:
            return
        import psycopg

        await self._ensure()
        rows = [_row(r) for r in records]
        refused = False
        try:
            async with self.db.connection(self.timeout_s) as conn, conn.transaction():
                await conn.execute(self._stage)
                async with conn.cursor().copy(self._copy) as copy:
                    for row in rows:
                        await copy.write_row(row)
                await conn.execute(self._insert)
                if _cp.ARMED:
                    _cp.hit("sink.before_commit")  # a transaction open, nothing committed
        except psycopg.DataError:
            refused = True
        if refused:  # outside the handler: a later error must not chain the first one,
            await self._one_by_one(rows)  # whose CONTEXT quotes the record

    async def _one_by_one(self, rows: list[tuple[str, Any, str, int]]) -> None:
        """Store each row in its own transaction; `RecordsRejected` for those refused with a
        data exception (anything else propagates: the batch is retried)."""
        import psycopg

        rejected: list[str] = []
        reasons: dict[str, None] = {}
        async with self.db.connection(self.timeout_s) as conn:
            for row in rows:
                try:
                    await conn.execute(self._insert_one, row)
                except psycopg.DataError as exc:
                    rejected.append(row[0])
                    reasons[f"{type(exc).__name__} (SQLSTATE {exc.sqlstate})"] = None
        if rejected:
            raise RecordsRejected(rejected, "; ".join(reasons))

    async def ids(self) -> list[str]:
        """Every stored id, in id (time) order; for tests and tools."""
        from psycopg import sql

        await self._ensure()
        async with self.db.connection() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT id FROM {} ORDER BY id").format(sql.Identifier(self.table))
            )
            return [row[0] for row in await cur.fetchall()]


def _row(r: Mapping[str, Any]) -> tuple[str, Any, str, int]:
    body = json.dumps(r.get("data"), ensure_ascii=False, separators=(",", ":"))
    return (r["id"], r.get("key"), body, int(r.get("ts", 0)))
