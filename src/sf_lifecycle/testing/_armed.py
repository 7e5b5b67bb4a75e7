"""Child side of `Service.arm()`: the user's app, plus a crash point that can be armed later.

`sf_service` runs `sf-lifecycle serve sf_lifecycle.testing._armed:app` with `SF_TESTING_APP`
naming the user's app; `app` here *is* that object (not a wrapper), so the server behaves exactly
as under `sf-lifecycle serve <user app>`. What this module adds is a SIGUSR1 handler: it reads a
crash point (`name[:N]`) from the file named by `SF_TESTING_ARM_FILE` and arms it in the running
process, as if `SF_CRASH_AT` had been set at start. The parent waits for the `sf-testing: armed`
line before it triggers the instant (SIGTERM for a drain, a POST for an append), so the kill
lands at the named step every time, with no sleep anywhere.

Deliberate choices:
- A signal, not a control endpoint: the user's app keeps its own routes, and the handler runs
  in the main thread between two bytecodes, where assigning module globals is atomic.
- The handler writes its acknowledgement straight to fd 2 (no logging handler, no lock).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from uvicorn.importer import import_from_string

from .. import _crashpoints

__all__ = ["ARMED_LINE"]

#: Printed (to stderr) once a crash point is armed; the parent waits for it.
ARMED_LINE = "sf-testing: armed"


def _arm(signum: int, frame: FrameType | None) -> None:
    raw = Path(os.environ["SF_TESTING_ARM_FILE"]).read_text().strip()
    try:
        # Same state `SF_CRASH_AT` would have produced at import; call sites read `ARMED`.
        _crashpoints.arm(raw)
    except ValueError as exc:
        os.write(2, f"sf-testing: cannot arm: {exc}\n".encode())
        return
    os.write(2, f"{ARMED_LINE} {raw}\n".encode())


_app: Any = None


def __getattr__(name: str) -> Any:
    # Resolved on first access (by `sf-lifecycle serve` in the child), so the parent can import
    # this module for `ARMED_LINE` without an app to load or a handler to install.
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        signal.signal(signal.SIGUSR1, _arm)
        _app = import_from_string(os.environ["SF_TESTING_APP"])
    return _app
