"""sf-lifecycle: upgrade an ASGI service behind a reverse proxy without dropping a request.

The public API is what `__all__` lists; the modules behind it are private.
"""

from importlib.metadata import PackageNotFoundError, version

from ._errors import (
    BudgetExceeded,
    ConfigError,
    DiskWriteError,
    InvalidEventId,
    InvalidSessionId,
    NotReady,
    QueueError,
    SfLifecycleError,
    UnsafePath,
)
from .config import Settings
from .events import EventLog, FileEventLog
from .feedback import feedback_routes
from .health import HealthApp, health_routes
from .lifecycle import Lifecycle
from .middleware import LifecycleMiddleware
from .queue import FeedbackQueue
from .runner import EXIT_BUDGET_EXCEEDED, EXIT_FORCED, EXIT_OK, serve
from .sink import Sink, SqliteSink
from .sse import session_event_routes
from .state import Phase, ShutdownState

try:
    __version__ = version("sf-lifecycle")
except PackageNotFoundError:  # pragma: no cover - imported from a source tree
    __version__ = "0+unknown"

__all__ = [
    "EXIT_BUDGET_EXCEEDED",
    "EXIT_FORCED",
    "EXIT_OK",
    "BudgetExceeded",
    "ConfigError",
    "DiskWriteError",
    "EventLog",
    "FeedbackQueue",
    "FileEventLog",
    "HealthApp",
    "InvalidEventId",
    "InvalidSessionId",
    "Lifecycle",
    "LifecycleMiddleware",
    "NotReady",
    "Phase",
    "QueueError",
    "Settings",
    "SfLifecycleError",
    "ShutdownState",
    "Sink",
    "SqliteSink",
    "UnsafePath",
    "__version__",
    "feedback_routes",
    "health_routes",
    "serve",
    "session_event_routes",
]
