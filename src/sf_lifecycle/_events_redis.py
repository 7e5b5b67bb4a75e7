"""`RedisEventLog`: session events in Redis Streams, shared by replicas on any number of hosts.

One stream per session (`<key_prefix><session>`), so replicas share no file: a client that
reconnects to a replica on another host resumes there. The protocol, the ids and the follow
loop are in `_events.py`; this is one backend of it, beside `FileEventLog`. Needs the `redis`
extra (`pip install sf-lifecycle[redis]`: redis-py's asyncio client).

Deliberate choices:

* **The stream id is the SSE id, and it is `<epoch>-<seq>`.** An append runs one Lua script
  that reads the last id the stream generated (`XINFO STREAM`, so an `XDEL` of the newest
  entries does not stop it) and `XADDs` the next one explicitly: `epoch` is the millisecond
  the stream was created, `seq` counts 1, 2, 3... So ids are dense (a `lost` event
  says exactly how many events a client missed), compare as the file backend's do, and an id
  from another log (the file backend, or a stream that expired and was created again) has
  another epoch and is answered with a `lost` event (`reset`), never a silent replay from an
  unrelated position. The script is atomic: replicas appending at once never reuse a number.
* **A read is one Lua script too**: the stream's ends and the entries after the position
  come from one atomic call, so appends (and the trimming they do) between two round trips
  can never skip events without the `lost` event that counts them.
* **Retention: `XADD MAXLEN ~` by count, exact for readers, and an idle expiry.** Approximate
  trimming (whole radix-tree nodes) keeps memory bounded cheaply; a reader still sees only the
  newest `retention_events`, younger than `retention_ms`, as with files. Ids are not time-based,
  so `MINID` cannot trim by age; instead the key expires `idle_ttl_ms` after its last append
  (twice the age retention by default), so an idle session holds no memory.
* **Live events: one `XREAD BLOCK` per process** (`_redis_reader.StreamReader`) over every
  session with a waiting stream, on one connection of its own. Everything else (appends,
  `XRANGE` replay) goes through one connection pool per process. A thousand open streams cost
  two connections, not a thousand.
* **Redis down is an error with a clear name.** Every command has a socket timeout
  (`timeout_ms`), so a dead server never hangs a request or the shutdown. Failures are raised as
  `EventStoreUnavailable`: a publish answers 503, an open stream ends with `retry:` and the
  client resumes from its `Last-Event-ID` once Redis is back (no gap, if Redis kept the
  stream: persistence is Redis's configuration).
* **One client per event loop.** redis-py's asyncio connections belong to the loop that made
  them; a log used from another loop (a test client's thread) gets its own clients there.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._errors import ConfigError, EventStoreUnavailable
from ._events import Event, lost_event, parse_event_id, validate_session_id
from ._redact import redact_secrets, redact_url
from ._redis_reader import StreamReader

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["REDIS_SCHEMES", "RedisEventLog", "check_redis_url"]

#: URL schemes redis-py accepts (`unix://` for a socket path).
REDIS_SCHEMES = ("redis", "rediss", "unix")

# Reads the stream's last generated id and first entry (`XINFO STREAM`: the newest entries may
# have been deleted, and the numbering goes on after them). Shared by both scripts.
_ENDS = """
local function split(id)
  local dash = string.find(id, '-', 1, true)
  return string.sub(id, 1, dash - 1), tonumber(string.sub(id, dash + 1))
end
local function ends(key)
  if redis.call('EXISTS', key) == 0 then return nil end
  local info, last, first = redis.call('XINFO', 'STREAM', key), '0-0', false
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
    if info[i] == 'first-entry' then first = info[i + 1] end
  end
  if last == '0-0' then return nil end
  local epoch, head = split(last)
  local first_seq = head + 1
  if first then first_seq = select(2, split(first[1])) end
  return epoch, head, first_seq
end
"""

# KEYS[1]: the stream. ARGV: now_ms, data_json, maxlen, idle_ttl_ms. Returns the new id.
_APPEND = (
    _ENDS
    + """
local epoch, head = ends(KEYS[1])
if epoch == nil then epoch, head = ARGV[1], 0 end
local id = epoch .. '-' .. string.format('%d', head + 1)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], id, 't', ARGV[1], 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return id
"""
)

# KEYS[1]: the stream. ARGV: the caller's epoch ('' for none) and seq, retention_events, count.
# Returns false (no stream) or {epoch, head, start, entries}: the entries after seq `start`,
# which is the caller's seq, or the retention floor when the caller is behind it. One script,
# so no append (and no trimming) between reading the ends and the entries can open a gap.
_READ = (
    _ENDS
    + """
local epoch, head, first_seq = ends(KEYS[1])
if epoch == nil then return false end
local start = math.max(first_seq - 1, head - tonumber(ARGV[3]))
if ARGV[1] == epoch and tonumber(ARGV[2]) > start then start = tonumber(ARGV[2]) end
local entries = {}
if start < head then
  local after = '(' .. epoch .. '-' .. string.format('%d', start)
  entries = redis.call('XRANGE', KEYS[1], after, '+', 'COUNT', ARGV[4])
end
return {epoch, head, start, entries}
"""
)


def check_redis_url(url: object, variable: str = "SF_REDIS_URL") -> str:
    """Return `url` if redis-py can use it, else raise `ConfigError` naming `variable`.

    Checked at start-up, so that a URL redis-py would refuse at the first command (a port out of
    range, `unix://` without a path, a query parameter it does not know or cannot parse) stops
    the process with one line instead of failing every request. When redis-py is installed,
    the connection options are built with it exactly as `RedisEventLog` will (no I/O).
    The message shows the URL without its password, never the raw value.
    """
    problem = _url_problem(url) if isinstance(url, str) else "not a string"
    if problem is None:
        return str(url)
    shown = redact_url(url) if isinstance(url, str) else url
    raise ConfigError(
        variable,
        shown,
        f"{problem}; a Redis URL is redis://[:password@]host[:port][/db], rediss://...,"
        " or unix:///path/to/socket",
    )


_DB_PATH = re.compile(r"/?(\d+)?")


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # its text may quote a part of the URL: not shown
        return "the port is not a number from 1 to 65535" if "ort" in str(exc) else "unparsable"
    scheme = parts.scheme.lower()
    if scheme not in REDIS_SCHEMES:
        return "the scheme is not redis, rediss or unix"
    if scheme == "unix":
        if not parts.path:
            return "no socket path after unix://"
    elif not parts.hostname:
        return "no host"
    elif port == 0:
        return "the port is not a number from 1 to 65535"
    elif not _DB_PATH.fullmatch(parts.path):
        return "the path is not a database number (/0)"
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        return None  # the shape only: RedisEventLog itself needs redis-py
    try:
        _connection_pool(url, 1.0, 1).make_connection()  # builds the options, connects nowhere
    except Exception as exc:
        return f"redis-py refuses its options ({type(exc).__name__}: {redact_secrets(str(exc))})"
    return None


def _options(timeout_s: float) -> dict[str, Any]:
    """Connection options of both clients, beside those the URL gives."""
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError, TimeoutError
    from redis.retry import Retry

    # A connection idle for a second is PINGed before use, so one that a restarted Redis
    # closed is replaced before a write goes out on it.
    return {
        "socket_connect_timeout": timeout_s,
        "retry": Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
        "retry_on_error": [ConnectionError, TimeoutError],
        "health_check_interval": 1,
    }


def _connection_pool(url: str, timeout_s: float, max_connections: int) -> Any:
    from redis.asyncio import BlockingConnectionPool

    # Blocking: a burst of appends waits (up to the timeout) for a free connection rather
    # than failing with "Too many connections".
    return BlockingConnectionPool.from_url(
        url,
        socket_timeout=timeout_s,
        max_connections=max_connections,
        timeout=timeout_s,
        **_options(timeout_s),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class RedisEventLog:
    """Session events in Redis Streams, shared by every replica that uses the same Redis.

    Args:
        url: `redis://[:password@]host[:port][/db]`, `rediss://...` (TLS) or `unix://path`.
        key_prefix: Prepended to the session id to name its stream (and this log's wake keys).
        retention_events: Events per session a reader can still resume from.
        retention_ms: Age after which an event can no longer be resumed from.
        idle_ttl_ms: A session's stream is deleted this long after its last append (default:
            twice `retention_ms`); a client resuming after that gets a `lost` event.
        timeout_ms: Socket timeout of every command (and of connecting).
        block_ms: Longest single blocking read of the live reader.
        max_connections: Size of this process's connection pool.
        read_batch: Most events one `read_after` returns (`follow()` asks again for the rest).

    Raises:
        ConfigError: `url` is not a Redis URL.
        ImportError: redis-py is not installed (`pip install sf-lifecycle[redis]`).
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "sf:events:",
        retention_events: int = 10_000,
        retention_ms: int = 3_600_000,
        idle_ttl_ms: int | None = None,
        timeout_ms: int = 2_000,
        block_ms: int = 5_000,
        max_connections: int = 32,
        read_batch: int = 1_000,
    ) -> None:
        if min(retention_events, retention_ms, timeout_ms, block_ms, max_connections) < 1:
            raise ValueError("retention, timeouts and max_connections must be positive")
        try:
            import redis.asyncio  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "RedisEventLog needs redis-py: pip install 'sf-lifecycle[redis]'"
            ) from exc
        self.url = check_redis_url(url, "url")
        self.key_prefix = key_prefix
        self.retention_events = retention_events
        self.retention_ms = retention_ms
        self.idle_ttl_ms = 2 * retention_ms if idle_ttl_ms is None else idle_ttl_ms
        self.timeout_s = timeout_ms / 1000
        self.block_ms = block_ms
        self.max_connections = max_connections
        self.read_batch = read_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: Redis | None = None
        self._reader: StreamReader | None = None
        self._append: Any = None
        self._read_script: Any = None
        self._reads: dict[tuple[str, str | None], asyncio.Future[list[Event]]] = {}

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> RedisEventLog:
        """Build from `Settings`: `redis_url` (required) and the two `sse_retention_*`."""
        if not settings.redis_url:
            raise ConfigError("SF_REDIS_URL", None, "set it to use RedisEventLog")
        return cls(
            settings.redis_url,
            retention_events=settings.sse_retention_events,
            retention_ms=settings.sse_retention_ms,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"RedisEventLog({redact_url(self.url)!r}, key_prefix={self.key_prefix!r})"

    # -- public API ----------------------------------------------------------------------
    async def append(self, session: str, data: Any) -> str:
        """Append a JSON value to `session`; returns its id once Redis has it.

        Raises:
            InvalidSessionId: the session id is not 1-128 characters from `A-Z a-z 0-9 _ -`.
            ValueError, TypeError: `data` is not JSON (NaN and Infinity included).
            EventStoreUnavailable: Redis cannot be reached or refused; nothing was appended
                (unless the reply alone was lost: then the event is there, as after any
                network write whose answer never came).
        """
        key = self._key(session)
        data_json = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        self._clients()
        args = [_now_ms(), data_json, self.retention_events, self.idle_ttl_ms]
        script = functools.partial(self._append, keys=[key], args=args)
        return _text(await self._call(script, idempotent=False))

    async def read_after(self, session: str, last_id: str | None) -> list[Event]:
        """See `EventLog.read_after`. Raises `InvalidEventId` for a malformed `last_id` and
        `EventStoreUnavailable` when Redis cannot answer.

        Concurrent calls for the same session and position share one round trip: a thousand
        streams of one session woken by one append make one `XRANGE`, not a thousand.
        """
        pos = None if last_id is None else parse_event_id(last_id)
        key = self._key(session)
        self._clients()
        shared = self._reads.get((key, last_id))
        if shared is None:
            shared = asyncio.ensure_future(self._read(key, last_id, pos))
            self._reads[(key, last_id)] = shared
            shared.add_done_callback(functools.partial(self._read_done, (key, last_id)))
        return list(await asyncio.shield(shared))

    def _read_done(self, k: tuple[str, str | None], done: asyncio.Future[list[Event]]) -> None:
        if self._reads.get(k) is done:
            del self._reads[k]
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have gone (a stream closed)

    async def _read(
        self, key: str, last_id: str | None, pos: tuple[int, int] | None
    ) -> list[Event]:
        now = _now_ms()
        cutoff_ms = now - self.retention_ms
        cursor = pos
        while True:
            args = ["", 0] if cursor is None else [cursor[0], cursor[1]]
            args += [self.retention_events, self.read_batch]
            script = functools.partial(self._read_script, keys=[key], args=args)
            reply = await self._call(script)
            if not reply:
                return [] if pos is None else [lost_event(None, now, "reset", last_id, None)]
            epoch, head, start = int(_text(reply[0])), int(reply[1]), int(reply[2])
            if pos is not None and pos[0] == epoch and pos[1] > head:
                # The stream is behind the client (Redis lost writes it had acknowledged).
                return [lost_event(f"{epoch}-{head}", now, "ahead", last_id, None)]
            events: list[Event] = []
            for raw_id, raw_fields in reply[3]:
                event_id = _text(raw_id)
                fields = dict(zip(raw_fields[::2], raw_fields[1::2], strict=True))
                ts = int(fields[b"t"])
                if not events and ts < cutoff_ms:
                    start = parse_event_id(event_id)[1]  # expired by age
                    continue
                events.append(Event(event_id, _text(fields[b"d"]), ts))
            if events or len(reply[3]) < self.read_batch:
                break
            cursor = (epoch, start)  # a whole batch expired by age: read on from there
        if pos is None:
            return events
        if pos[0] != epoch:
            return [lost_event(f"{epoch}-{start}", now, "reset", last_id, None), *events]
        if start > pos[1]:
            lost = lost_event(f"{epoch}-{start}", now, "expired", last_id, start - pos[1])
            return [lost, *events]
        return events

    async def wait(self, session: str, last_id: str | None, timeout_s: float) -> bool:
        """See `EventLog.wait`: woken by the process's one blocking `XREAD` within a round
        trip of the append, whichever replica made it."""
        pos = None if last_id is None else parse_event_id(last_id)
        key = self._key(session)
        _, reader = self._clients()
        return await reader.wait(key, pos, timeout_s)

    async def ping(self) -> dict[str, Any]:
        """A readiness check (`Lifecycle.add_readiness_check`): `PING`, with its latency.

        Raises:
            EventStoreUnavailable: no answer within the timeout; the message has no password.
        """
        pool, _ = self._clients()
        began = time.monotonic()
        await self._call(pool.ping)
        return {"backend": "redis", "ping_ms": round((time.monotonic() - began) * 1000, 2)}

    async def aclose(self) -> None:
        """Stop the live reader and close this loop's connections (a shutdown hook)."""
        reader, pool = self._reader, self._pool
        self._reader = self._pool = self._loop = None
        if reader is not None:
            await reader.aclose()
        if pool is not None:
            await pool.aclose()

    # -- internals ---------------------------------------------------------------------------
    def _key(self, session: str) -> str:
        return self.key_prefix + validate_session_id(session)

    def _clients(self) -> tuple[Redis, StreamReader]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._pool is None or self._reader is None:
            from redis.asyncio import Redis

            try:
                pool = _connection_pool(self.url, self.timeout_s, self.max_connections)
                blocking = Redis.from_url(
                    self.url,
                    socket_timeout=self.block_ms / 1000 + self.timeout_s,
                    max_connections=1,
                    **_options(self.timeout_s),
                )
                pool.make_connection()  # builds the options (no I/O): refused here, not later
                blocking_pool: Any = blocking.connection_pool
                blocking_pool.make_connection()
            except Exception as exc:  # the URL was checked: a 503, never a 500, regardless
                raise EventStoreUnavailable(
                    f"event store (Redis at {redact_url(self.url)}) cannot be used: "
                    f"{type(exc).__name__}: {redact_secrets(str(exc))}"
                ) from exc
            self._pool = Redis.from_pool(pool)
            self._reader = StreamReader(blocking, self._pool, self.key_prefix, self.block_ms)
            self._append = self._pool.register_script(_APPEND)
            self._read_script = self._pool.register_script(_READ)
            self._reads = {}
            self._loop = loop
        return self._pool, self._reader

    async def _call(self, fn: Callable[[], Awaitable[Any]], *, idempotent: bool = True) -> Any:
        """Run one Redis call; `EventStoreUnavailable` for any failure.

        A read is tried once more on a connection error: a pooled connection that a restarted
        Redis closed fails once (redis-py's own retry does not cover it). An append is not:
        whether it was applied is unknown, and the client's retry of the 503 is the retry.
        """
        from redis.exceptions import ConnectionError, RedisError

        try:
            async with asyncio.timeout(self.timeout_s * 2 + 1):
                try:
                    return await fn()
                except ConnectionError:
                    if not idempotent:
                        raise
                    return await fn()
        except (RedisError, OSError, TimeoutError) as exc:
            raise EventStoreUnavailable(
                f"event store (Redis at {redact_url(self.url)}) unavailable: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
