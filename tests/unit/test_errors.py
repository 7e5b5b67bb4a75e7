"""The exception tree: every class pickles, and the tree drawn in `_errors` is the real one."""

from __future__ import annotations

import errno
import pickle

import pytest

from sf_lifecycle import _errors
from sf_lifecycle._errors import (
    BackendUnavailable,
    BudgetExceeded,
    ConfigError,
    DiskWriteError,
    EventStoreUnavailable,
    InvalidEventId,
    InvalidSessionId,
    NotReady,
    QueueError,
    RecordsRejected,
    SfLifecycleError,
    StorageError,
    UnsafePath,
)
from sf_lifecycle.testing import CrashPointMissed, DeliveryReport, LostWrites

_REPORT = DeliveryReport(
    acknowledged=("a", "b"),
    lost=("b",),
    duplicated={"a": 2},
    unknown=(),
    draining=(),
    quarantined=(),
    unacknowledged=0,
)

#: One instance of each class, built the way the library builds it.
INSTANCES: list[BaseException] = [
    SfLifecycleError("base"),
    ConfigError("SF_RPC_SHUTDOWN_GRACE_MS", "-1", "a whole number of ms >= 0"),
    InvalidSessionId("invalid session id 'a/b'"),
    InvalidEventId("invalid event id 'x'"),
    NotReady("the sink is not reachable"),
    BudgetExceeded("feedback queue: 2 file(s) not delivered before the deadline"),
    QueueError("the feedback queue is closed"),
    StorageError(errno.EIO, "cannot list the state directory"),
    DiskWriteError(errno.ENOSPC, "append failed: No space left on device"),
    UnsafePath(errno.ELOOP, "sessions is a symbolic link; refusing to follow it"),
    EventStoreUnavailable("event store (Redis at redis://h:6379/0) unavailable: ConnectionError"),
    BackendUnavailable("PostgreSQL: PoolTimeout: couldn't get a connection after 5.00 sec"),
    RecordsRejected(["r1", "r2"], "UntranslatableCharacter (SQLSTATE 22P05)"),
    CrashPointMissed("the process exited 0 instead of dying at drain.after_rename"),
    LostWrites(_REPORT),
]


def _all_classes() -> set[type[BaseException]]:
    found = {
        obj
        for name in _errors.__all__
        if isinstance(obj := getattr(_errors, name), type) and issubclass(obj, BaseException)
    }
    return found | {CrashPointMissed, LostWrites}


def test_a_disk_write_error_is_an_os_error_and_a_queue_error() -> None:
    """Built as `OSError(errno, strerror)` is, caught by `except OSError`, `StorageError` and
    `QueueError` alike, and the same after a pickle round trip."""
    exc = DiskWriteError(errno.ENOSPC, "append failed: No space left on device")
    assert (exc.errno, exc.strerror) == (errno.ENOSPC, "append failed: No space left on device")
    back = pickle.loads(pickle.dumps(exc))
    for e in (exc, back):
        for cls in (OSError, StorageError, QueueError, SfLifecycleError):
            with pytest.raises(cls):
                raise e
    assert back.errno == errno.ENOSPC
    assert DiskWriteError.__mro__.index(StorageError) < DiskWriteError.__mro__.index(QueueError)


def test_every_exception_class_is_covered() -> None:
    assert {type(e) for e in INSTANCES} == _all_classes()


@pytest.mark.parametrize("exc", INSTANCES, ids=lambda e: type(e).__name__)
def test_every_exception_pickles(exc: BaseException) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.args == exc.args
    for attr in ("errno", "strerror", "variable", "value", "allowed", "reason"):
        assert getattr(back, attr, None) == getattr(exc, attr, None), attr
    if isinstance(exc, LostWrites):
        assert isinstance(back, LostWrites)
        assert back.report == exc.report


def test_the_tree_is_the_one_drawn() -> None:
    """What callers catch: one base for everything, one for disk trouble of any part."""
    for cls in _all_classes():
        assert issubclass(cls, SfLifecycleError), cls
    assert issubclass(DiskWriteError, StorageError)
    assert issubclass(UnsafePath, StorageError)
    assert issubclass(StorageError, OSError)
    # `except QueueError` around an append catches a full disk as well as a closed queue.
    assert issubclass(DiskWriteError, QueueError)
    assert not issubclass(StorageError, QueueError)
    assert not issubclass(UnsafePath, QueueError)
    assert issubclass(BudgetExceeded, TimeoutError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(CrashPointMissed, AssertionError)
    assert issubclass(LostWrites, AssertionError)
    doc = _errors.__doc__ or ""
    for cls in _all_classes():
        assert f"{cls.__name__}" in doc, cls
