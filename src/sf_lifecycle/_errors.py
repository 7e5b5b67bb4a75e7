"""Exceptions raised by sf-lifecycle.

The tree, so that callers can catch as broadly or narrowly as they need::

    SfLifecycleError
    ├── ConfigError(ValueError)         a setting is invalid; names the variable
    ├── NotReady                        a readiness check says "not yet"; carries the reason
    ├── BudgetExceeded(TimeoutError)    the shutdown grace budget ran out
    └── QueueError
        ├── DiskWriteError(OSError)     the disk refused an append; nothing was acknowledged
        └── CorruptRecord               a queue record failed its length or checksum test

Every exception pickles, so it can cross a process boundary (multiprocessing, test harnesses).
"""

from __future__ import annotations

__all__ = [
    "BudgetExceeded",
    "ConfigError",
    "CorruptRecord",
    "DiskWriteError",
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


class CorruptRecord(QueueError):
    """A queue record failed its length or checksum test; the file is quarantined, not deleted."""
