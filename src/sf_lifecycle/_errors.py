"""Exceptions raised by sf-lifecycle.

The tree, so that callers can catch as broadly or narrowly as they need::

    SfLifecycleError
    ├── ConfigError(ValueError)         a setting is invalid; names the variable
    ├── InvalidSessionId(ValueError)    a session id that cannot name a file safely
    ├── InvalidEventId(ValueError)      a Last-Event-ID this log never handed out
    ├── NotReady                        a readiness check says "not yet"; carries the reason
    ├── BudgetExceeded(TimeoutError)    the shutdown grace budget ran out
    ├── UnsafePath(OSError)             a link where the state directory keeps a file
    └── QueueError
        └── DiskWriteError(OSError)     the disk refused an append; nothing was acknowledged

Damaged data on disk raises nothing: it is quarantined with a log line (see ARCHITECTURE.md).

Every exception pickles, so it can cross a process boundary (multiprocessing, test harnesses).
"""

from __future__ import annotations

__all__ = [
    "BudgetExceeded",
    "ConfigError",
    "DiskWriteError",
    "InvalidEventId",
    "InvalidSessionId",
    "NotReady",
    "QueueError",
    "SfLifecycleError",
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
    """Base class of feedback-queue errors."""


class DiskWriteError(QueueError, OSError):
    """The disk refused a write (ENOSPC, EIO, ...). The record was not acknowledged.

    Retry later; the HTTP layer answers 503 so clients do the same.
    """


class InvalidSessionId(SfLifecycleError, ValueError):
    """A session id is not 1-128 characters from `A-Z a-z 0-9 _ -` (it names a file)."""


class InvalidEventId(SfLifecycleError, ValueError):
    """A `Last-Event-ID` is not of the form `<epoch>-<seq>` this log hands out."""


class UnsafePath(SfLifecycleError, OSError):
    """A symbolic link (or another non-regular file) where the library keeps its state.

    Refused rather than followed: whoever can write into the state directory must not be able to
    make the service read, truncate or delete a file elsewhere through a link.
    """
