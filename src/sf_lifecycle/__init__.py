"""sf-lifecycle: upgrade an ASGI service behind a reverse proxy without dropping a request.

The public API is what `__all__` lists; the modules behind it are private.

The queue, the sink and the event streams load on first use (PEP 562), so an app that only wants
the health routes and the drain does not pay for SQLite, filelock and sse-starlette at import.
"""

from typing import TYPE_CHECKING, Any

from ._errors import (
    BudgetExceeded,
    ConfigError,
    DiskWriteError,
    InvalidEventId,
    InvalidSessionId,
    NotReady,
    QueueError,
    SfLifecycleError,
    StorageError,
    UnsafePath,
)
from ._middleware import LifecycleMiddleware
from ._runner import ExitCode, serve
from .config import Settings
from .lifecycle import Lifecycle
from .state import Phase

if TYPE_CHECKING:
    from .events import EventLog
    from .events_file import FileEventLog
    from .feedback import feedback_routes
    from .queue import FeedbackQueue
    from .sink import Sink, SqliteSink
    from .sse import session_event_routes

    __version__: str

#: Public name -> the module that defines it, imported on first access.
_LAZY = {
    "EventLog": "events",
    "FileEventLog": "events_file",
    "FeedbackQueue": "queue",
    "Sink": "sink",
    "SqliteSink": "sink",
    "feedback_routes": "feedback",
    "session_event_routes": "sse",
}


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
    "DiskWriteError",
    "EventLog",
    "ExitCode",
    "FeedbackQueue",
    "FileEventLog",
    "InvalidEventId",
    "InvalidSessionId",
    "Lifecycle",
    "LifecycleMiddleware",
    "NotReady",
    "Phase",
    "QueueError",
    "Settings",
    "SfLifecycleError",
    "Sink",
    "SqliteSink",
    "StorageError",
    "UnsafePath",
    "__version__",
    "feedback_routes",
    "serve",
    "session_event_routes",
]
