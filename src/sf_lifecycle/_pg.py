"""What the PostgreSQL backends share: the driver import, the URL, identifiers, one pool.

The driver is psycopg 3 with psycopg-pool (the `[postgres]` extra; ARCHITECTURE.md says why).
Nothing here is imported by the core: `sf_lifecycle.postgres` is the only way in, and it
raises an `ImportError` naming the extra when the driver is missing.

`Database` is one bounded async connection pool per process, shared by the sink, the
idempotency index and the event log. Every connection has a connect timeout, TCP keepalives, a
TCP user timeout and a statement timeout, and a pooled connection is checked before it is
handed out. Those catch a dead or restarted server, not a hung one (a frozen or overloaded
server whose kernel still acknowledges every packet; `statement_timeout` is enforced by the
server itself), so every call is also bounded on the client (`call_timeout_s`): getting a
connection is cancelled at the deadline, and a connection still in use then is severed (its
socket shut down, so the driver's pending read and any rollback fail at once, and the pool
discards it). A call therefore raises `BackendUnavailable` within its bound whatever the
server does: the drainer retries with its backoff, a keyed write answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._errors import BackendUnavailable, ConfigError
from ._redact import describe_error, redact_url

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["Database", "check_identifier", "check_url", "redact_url", "require_driver"]


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
_SCHEMES = ("postgres", "postgresql")


def require_driver() -> None:
    """Import psycopg and psycopg-pool, or raise an `ImportError` that names the extra."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "the PostgreSQL backends need psycopg 3 and psycopg-pool: "
            "pip install 'sf-lifecycle[postgres]'"
        ) from exc


def check_url(url: str, source: str = "SF_DATABASE_URL") -> str:
    """`url` if it is a `postgres://` or `postgresql://` URL, else `ConfigError` naming `source`.

    The value in the error has its password replaced: a URL is a secret.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in _SCHEMES:
        raise ConfigError(
            source,
            redact_url(url),
            "a URL such as postgresql://user:password@host:5432/dbname",
        )
    return url


def check_identifier(name: object, source: str) -> str:
    """A table name the backends may create: a plain SQL identifier, else `ConfigError`."""
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ConfigError(source, name, "an SQL identifier: a letter or _, then A-Z a-z 0-9 _")
    return name


class Database:
    """One bounded pool of connections to one PostgreSQL database, opened on first use.

    Args:
        url: `postgresql://...` (libpq's URL form).
        min_size: Connections kept open.
        max_size: Most connections this process opens (the pool bounds it).
        connect_timeout_s: How long connecting, or waiting for a free connection, may take.
        statement_timeout_ms: Longest statement the server runs for this pool.
        call_timeout_s: Longest a `connection()` block may take, on the client's clock,
            getting the connection included (a hung server cannot hold a request or a drain
            longer); a block may ask for another bound.
    """

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout_s: float = 5.0,
        statement_timeout_ms: int = 30_000,
        call_timeout_s: float = 5.0,
    ) -> None:
        require_driver()
        self.url = check_url(url, "url")
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_ms = statement_timeout_ms
        self.call_timeout_s = call_timeout_s
        self._pool: psycopg_pool.AsyncConnectionPool | None = None
        self._ready: set[str] = set()  # schemas created by this process

    def __repr__(self) -> str:
        return f"Database({redact_url(self.url)!r})"

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every connection (timeouts; no prepared statements, so a
        pooler in transaction mode is fine)."""
        return {
            "connect_timeout": max(1, round(self.connect_timeout_s)),
            "options": f"-c statement_timeout={int(self.statement_timeout_ms)}",
            "autocommit": True,
            # A peer that vanished (host down, cable cut): found in ~10 s, not TCP's ~2 h.
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": 10_000,
        }

    async def _open(self) -> psycopg_pool.AsyncConnectionPool:
        if self._pool is None:
            from psycopg_pool import AsyncConnectionPool

            pool: psycopg_pool.AsyncConnectionPool = AsyncConnectionPool(
                self.url,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=self.connect_timeout_s,
                kwargs=self.connect_kwargs(),
                # No `check`: `connection()` checks, within its own deadline (`_checked`).
                reconnect_timeout=0,  # never give up reconnecting: the server comes back
                open=False,
                name="sf-lifecycle",
            )
            await pool.open(wait=False)
            self._pool = pool
        return self._pool

    @contextlib.asynccontextmanager
    async def connection(
        self, timeout_s: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection (autocommit: use `conn.transaction()`), for at most
        `timeout_s` (`call_timeout_s` when None) from this call, getting it included.

        Raises:
            BackendUnavailable: no connection in time, the block ran out of time (the
                connection is severed and discarded), or the server failed the call
                (connection lost, timeout); the message has no password.
        """
        import psycopg
        import psycopg_pool

        limit = self.call_timeout_s if timeout_s is None else timeout_s
        pool = await self._open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        severed: list[bool] = []
        try:
            async with contextlib.AsyncExitStack() as stack:
                conn = await self._checked(pool, stack, deadline, severed)
                try:
                    yield conn
                except BaseException:
                    if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        # Cancelled or failed mid-call: the pool would roll back over the
                        # network, which a hung server never answers. Discard instead.
                        _sever(conn, severed)
                    raise
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout, TimeoutError) as exc:
            if severed or isinstance(exc, TimeoutError):
                raise BackendUnavailable(f"PostgreSQL: no answer within {limit:g} s") from exc
            raise BackendUnavailable(f"PostgreSQL: {describe_error(exc)}") from exc

    async def _checked(
        self,
        pool: psycopg_pool.AsyncConnectionPool,
        stack: contextlib.AsyncExitStack,
        deadline: float,
        severed: list[bool],
    ) -> psycopg.AsyncConnection[Any]:
        """A pooled connection that answered an empty query, severed at `deadline`.

        The check is ours, not the pool's: cancelling the pool's check of a hung server
        makes the driver try to cancel the query first, which waits seconds more; a severed
        socket fails at once. A connection that fails the check (the server restarted) is
        discarded by the pool and the next one is tried.
        """
        import psycopg

        loop = asyncio.get_running_loop()
        while True:
            # Waiting for a pooled connection or a new one (bounded by connect_timeout):
            # nothing runs on the server yet, so a cancellation here costs nothing.
            async with asyncio.timeout_at(deadline):
                inner = contextlib.AsyncExitStack()
                conn = await inner.enter_async_context(pool.connection())
            timer = loop.call_at(deadline, _sever, conn, severed)
            try:
                await conn.execute("")
            except psycopg.OperationalError:
                timer.cancel()
                await inner.aclose()  # broken: the pool discards it
                if severed:
                    raise
                continue
            except BaseException:
                timer.cancel()
                _sever(conn, severed)
                await inner.aclose()
                raise
            stack.push_async_callback(inner.aclose)
            stack.callback(timer.cancel)
            return conn

    async def ensure(self, name: str, create: Callable[[Any], Awaitable[None]]) -> None:
        """Run `create(conn)` once per process under a transaction-level advisory lock, so
        replicas starting together do not race on `CREATE TABLE IF NOT EXISTS`."""
        if name in self._ready:
            return
        async with self.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))
            await create(conn)
        self._ready.add(name)

    async def close(self) -> None:
        """Close the pool (idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=1.0)


def _sever(conn: Any, severed: list[bool]) -> None:
    """Shut `conn`'s socket down: its pending read ends at once (the driver raises
    `OperationalError`) and the pool discards it instead of rolling back over the network."""
    with contextlib.suppress(Exception):
        fd = conn.pgconn.socket
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()
        severed.append(True)
