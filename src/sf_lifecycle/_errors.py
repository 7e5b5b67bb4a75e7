"""Exceptions raised by sf-lifecycle.

The tree, so that callers can catch as broadly or narrowly as they need::

    SfLifecycleError
    ├── ConfigError(ValueError)         a setting is invalid; names the variable
    ├── InvalidSessionId(ValueError)    a session id that cannot name a file safely
    ├── InvalidEventId(ValueError)      a Last-Event-ID this log never handed out
    ├── NotReady                        a readiness check says "not yet"; carries the reason
    ├── BudgetExceeded(TimeoutError)    the shutdown grace budget ran out
    ├── QueueError                      the feedback queue cannot take the call: closed, its
    │                                   token taken, or (DiskWriteError) the disk refused it
    ├── StorageError(OSError)           the state directory refused an operation
    │   ├── DiskWriteError(QueueError)  the disk refused a write (queue append, event append);
    │   │                               nothing was acknowledged
    │   ├── UnsafePath                  a link where the state directory keeps a file
    │   └── BackendUnavailable          a database server (PostgreSQL) did not answer; retryable
    ├── RecordsRejected                 a sink stored a batch but these records, which it can
    │                                   never store (the queue quarantines them and goes on)
    ├── EventStoreUnavailable(ConnectionError)  a networked event store (Redis, PostgreSQL) cannot
    │                                   be reached or refused the command; nothing was appended
    │
    │   in sf_lifecycle.testing, for tests of a service (AssertionError: a test failure):
    ├── CrashPointMissed(AssertionError)  the process did not die at the armed crash point
    └── LostWrites(AssertionError)        the sink lacks an acknowledged write, or holds one twice

`StorageError` is raised for a write the disk refused (the queue's and the event log's appends:
`DiskWriteError`) and for a link or non-regular file where state is kept (`UnsafePath`, any
part): catch it to answer 503 (the HTTP layer does) or to alert an operator. `DiskWriteError` is
also a `QueueError`, so `except QueueError` around `FeedbackQueue.append` catches a full disk as
well as a closed queue. Errors of SQLite (the sink, the idempotency index) are not converted:
they are `sqlite3.Error` as SQLite raised it, or `OSError` when the file cannot be opened. Damaged
data on disk raises nothing: it is quarantined with a log line (see ARCHITECTURE.md).

Every exception pickles, so it can cross a process boundary (multiprocessing, test harnesses).
`sf_lifecycle` exports all but `DiskWriteError`, `QueueError`, `InvalidSessionId`,
`InvalidEventId` and `EventStoreUnavailable` (caught as `ConnectionError`, or answered 503 by
the HTTP layer), which callers catch as a base (why: the package's docstring), and
`BackendUnavailable`, which `sf_lifecycle.postgres` exports (caught as `OSError` too).
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "BudgetExceeded",
    "ConfigError",
    "DiskWriteError",
    "EventStoreUnavailable",
    "InvalidEventId",
    "InvalidSessionId",
    "NotReady",
    "QueueError",
    "RecordsRejected",
    "SfLifecycleError",
    "StorageError",
    "UnsafePath",
]


class SfLifecycleError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(SfLifecycleError, ValueError):
    """A setting is invalid. Raised at start-up, before anything listens.

    The message names the variable (or argument), the value given and what is allowed.
    """

    def __init__(self, variable: str, value: object, allowed: str) -> None:
        self.variable = variable
        self.value = value
        self.allowed = allowed
        super().__init__(variable, value, allowed)

    def __str__(self) -> str:
        return f"invalid {self.variable}={self.value!r}: {self.allowed}"


class NotReady(SfLifecycleError):
    """Raised by a readiness check to keep `/api/ready` at 503, with a reason for the operator."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class BudgetExceeded(SfLifecycleError, TimeoutError):
    """The grace budget (`SF_RPC_SHUTDOWN_GRACE_MS`) ran out before shutdown work finished.

    Whatever was left undone stays on disk for the next start to recover.
    """


class QueueError(SfLifecycleError):
    """The feedback queue cannot take the call: it is closed, or its process token is taken.

    A refused write is a `QueueError` too (`DiskWriteError`), so one `except QueueError` around
    `FeedbackQueue.append` covers a closed queue and a full disk alike.
    """


class StorageError(SfLifecycleError, OSError):
    """The state directory refused an operation; `errno` says why when the OS did.

    Raised for writes the disk refused (`DiskWriteError`: the queue's and the event log's
    appends) and for links where state is kept (`UnsafePath`). SQLite's errors (the sink, the
    idempotency index) are not converted: catch `sqlite3.Error` for those.
    """


class DiskWriteError(StorageError, QueueError):
    """The disk refused a write (ENOSPC, EIO, ...). Nothing was acknowledged.

    Retry later; the HTTP layer answers 503 (`disk_write_failed`) so clients do the same. Both a
    `StorageError` (an `OSError` with its `errno`) and a `QueueError`: code written against
    either catches it.
    """


class RecordsRejected(SfLifecycleError):
    """Raised by a sink: the batch is committed except these records, which it can never store.

    For data the sink refuses for good (PostgreSQL's jsonb refuses `\\u0000`; a constraint
    violation), never for an outage (raise anything else: the batch stays queued and is
    retried). The queue moves the records to `feedback/quarantine/` with the reason, logs their
    ids, counts them and goes on: one poison record must not block every record behind it.

    Args:
        ids: The rejected records' ids (each one of the batch).
        reason: Why, for logs and the quarantine: an error class and code, never body content.
    """

    def __init__(self, ids: tuple[str, ...] | list[str], reason: str) -> None:
        self.ids = tuple(ids)
        self.reason = reason
        super().__init__(self.ids, reason)

    def __str__(self) -> str:
        return f"{len(self.ids)} record(s) can never be stored: {self.reason}"


class EventStoreUnavailable(SfLifecycleError, ConnectionError):
    """A networked event store (`RedisEventLog`, `PostgresEventLog`) cannot be reached, timed
    out or refused.

    Nothing was appended. The HTTP layer answers a publish with 503 (`event_store_unavailable`)
    and ends open streams with a `retry:` hint, so clients come back (with `Last-Event-ID`)
    once the store is.
    """


class InvalidSessionId(SfLifecycleError, ValueError):
    """A session id is not 1-128 characters from `A-Z a-z 0-9 _ -` (it names a file)."""


class InvalidEventId(SfLifecycleError, ValueError):
    """A `Last-Event-ID` is not of the form `<epoch>-<seq>` this log hands out."""


class UnsafePath(StorageError):
    """A symbolic link (or another non-regular file) where the library keeps its state.

    Refused rather than followed: whoever can write into the state directory must not be able to
    make the service read, truncate or delete a file elsewhere through a link.
    """


class BackendUnavailable(StorageError):
    """A database server the state lives in (PostgreSQL) did not answer in time or failed.

    Retryable: the drainer retries a batch with its backoff, a keyed write answers 503. The
    message carries no password (`_redact`).
    """
