"""Named crash points: make the process SIGKILL itself at an exact step, for crash tests.

`SF_CRASH_AT=name[:N]` kills the process (SIGKILL, as `docker kill` would) the N-th time the
point `name` is reached (N defaults to 1). The variable is read once, at import: when it is unset
`ARMED` is False and every call site costs one attribute load and a branch::

    if _crashpoints.ARMED:
        _crashpoints.hit("drain.after_rename")

A real SIGKILL, not an exception: nothing runs after it (no `finally`, no flush, no lock
release other than the kernel's), which is exactly what the crash-safety argument must survive.
The points the queue declares are listed in `POINTS`; an unknown name in `SF_CRASH_AT` is an
error at import so a typo cannot make a crash test pass without crashing.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["ARMED", "POINTS", "arm", "hit"]


#: Every crash point the library declares, in the order a record meets them.
POINTS = frozenset(
    {
        "append.after_open",
        "append.before_write",
        "append.after_write",
        "append.after_fsync",
        "drain.before_rename",
        "drain.after_rename",
        "sink.before_commit",
        "drain.after_sink_commit",
        "drain.before_unlink",
        "drain.after_unlink",
        "recover.after_claim",
        "recover.before_lock_unlink",
    }
)


def _parse(raw: str | None) -> tuple[str, int] | None:
    if raw is None or not raw.strip():
        return None
    name, _, count = raw.strip().partition(":")
    if name not in POINTS:
        raise ValueError(f"SF_CRASH_AT={raw!r}: unknown crash point; known: {sorted(POINTS)}")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise ValueError(f"SF_CRASH_AT={raw!r}: N must be a positive integer") from None
    if n < 1:
        raise ValueError(f"SF_CRASH_AT={raw!r}: N must be a positive integer")
    return name, n


_TARGET = _parse(os.environ.get("SF_CRASH_AT"))
#: True only when `SF_CRASH_AT` names a point; call sites test it before calling `hit`.
ARMED = _TARGET is not None
_hits = 0


def arm(spec: str | None) -> None:
    """Arm `name[:N]` now (as `SF_CRASH_AT` does at import), or disarm with None.

    For test harnesses that arm a running process; raises `ValueError` for an unknown point.
    """
    global _TARGET, ARMED, _hits
    target = _parse(spec)
    _TARGET, ARMED, _hits = target, target is not None, 0


def hit(name: str) -> None:
    """Count a pass through `name`; SIGKILL this process at the configured N-th pass."""
    global _hits
    if _TARGET is None or name != _TARGET[0]:
        return
    _hits += 1
    if _hits >= _TARGET[1]:
        # Written straight to fd 2: a logging handler may buffer, and the test reads this line.
        os.write(2, f"sf-crashpoint: SIGKILL at {name} (hit {_hits})\n".encode())
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
