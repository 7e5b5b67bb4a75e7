"""sf-lifecycle: upgrade an ASGI service behind a reverse proxy without dropping a request.

The public API is what `__all__` lists; the modules behind it are private (a leading underscore),
except `sf_lifecycle.testing`, `sf_lifecycle.report`, `sf_lifecycle.idempotency`
(`IdempotencyIndex`, for an app that builds its own index for `feedback_routes`) and
`sf_lifecycle.metrics` (Prometheus, with the `metrics` extra).

The top level names what a user writes in code: the app's wiring (`Lifecycle`, the middleware,
`serve`, the routes, the queue, sinks and event logs with their protocols, `Settings`, `Phase`,
`ExitCode`) and the exceptions worth catching or raising. Four leaves of the exception tree are
left out on purpose: `DiskWriteError` is caught as its base `StorageError`; `QueueError` (a closed
queue, a process token taken) is a wiring or shutdown fault, caught as `SfLifecycleError` when at
all; `InvalidSessionId` and `InvalidEventId` are answered by the endpoints as 400 problems
(`invalid_session_id`, `invalid_event_id`), and a caller of `FileEventLog` catches them as
`ValueError`. All four are in the tree drawn in `_errors.py` and still pickle.

The queue, the sink and the event streams load on first use (PEP 562), so an app that only wants
the health routes and the drain does not pay for SQLite, filelock and sse-starlette at import.
"""

from typing import TYPE_CHECKING, Any

from ._config import Settings
from ._errors import (
    BudgetExceeded,
    ConfigError,
    NotReady,
    RecordsRejected,
    SfLifecycleError,
    StorageError,
    UnsafePath,
)
from ._lifecycle import Lifecycle
from ._logging import configure_logging
from ._middleware import LifecycleMiddleware
from ._runner import ExitCode, serve
from ._state import Phase

if TYPE_CHECKING:
    from ._events import EventLog
    from ._events_file import FileEventLog
    from ._events_redis import RedisEventLog
    from ._feedback import feedback_routes
    from ._queue import FeedbackQueue
    from ._sink import Sink, SqliteSink
    from ._sse import session_event_routes

    __version__: str

#: Public name -> the module that defines it, imported on first access.
_LAZY = {
    "EventLog": "_events",
    "FileEventLog": "_events_file",
    "FeedbackQueue": "_queue",
    "RedisEventLog": "_events_redis",
    "Sink": "_sink",
    "SqliteSink": "_sink",
    "feedback_routes": "_feedback",
    "session_event_routes": "_sse",
}


def __dir__() -> list[str]:
    # The lazily loaded names too, so `dir()`, `help()` and completion show the whole API.
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value: Any = version("sf-lifecycle")
        except PackageNotFoundError:  # pragma: no cover - imported from a source tree
            value = "0+unknown"
    elif name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "BudgetExceeded",
    "ConfigError",
    "EventLog",
    "ExitCode",
    "FeedbackQueue",
    "FileEventLog",
    "Lifecycle",
    "LifecycleMiddleware",
    "NotReady",
    "Phase",
    "RecordsRejected",
    "RedisEventLog",
    "Settings",
    "SfLifecycleError",
    "Sink",
    "SqliteSink",
    "StorageError",
    "UnsafePath",
    "__version__",
    "configure_logging",
    "feedback_routes",
    "serve",
    "session_event_routes",
]
