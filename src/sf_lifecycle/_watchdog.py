"""The hard ceiling on the process's life: a thread that ends the process at a set instant.

The event loop cannot enforce the grace budget on its own: a sink that blocks the loop, a
thread the interpreter joins at exit (`asyncio.to_thread`, a SQLite call waiting for another
process's lock) or a hook that ignores cancellation all hold the exit past the budget, into the
orchestrator's SIGKILL. This thread waits on a pipe, not on the loop or any lock, so it fires
whatever the main thread is doing.

`arm()` takes no lock and allocates nothing it must wait for (one tuple store, one `os.write`
to a non-blocking pipe), so the runner calls it from its signal handler: a second SIGINT exits
at once even while the loop is blocked.

Ending the process with `os._exit` is safe for the data: it is what the orchestrator's SIGKILL
would do a moment later, and the queue is built for that (an append is fsynced before it is
acknowledged, a torn tail is never acknowledged, recovery re-delivers `.draining` files, the
sink is idempotent by id, SQLite commits are atomic). Nothing half-written can be mistaken for
data; the random-kill campaign (RELIABILITY.md) exercises exactly this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import threading
import time

__all__ = ["Watchdog"]

logger = logging.getLogger("sf_lifecycle.runner")

#: How long the last log line may take before the process ends anyway (a stuck stderr).
_LAST_WORDS_S = 0.5


class Watchdog:
    """A daemon thread that calls `os._exit(code)` at a monotonic instant unless disarmed."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        #: (monotonic instant, exit code, last log line), or None when disarmed.
        self._plan: tuple[float, int, str] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sf-watchdog", daemon=True)
        self._thread.start()

    @property
    def plan(self) -> tuple[float, int, str] | None:
        return self._plan

    def arm(self, at: float, code: int, reason: str) -> None:
        """Exit with `code` at `at` (monotonic), logging `reason`; replaces any earlier plan.

        Safe in a signal handler: one atomic store and a non-blocking write.
        """
        self._plan = (at, code, reason)
        self._poke()

    def disarm(self) -> None:
        self._plan = None
        self._poke()

    def close(self) -> None:
        """Disarm and stop the thread (call when the process is not ending after all)."""
        if self._closed:
            return
        self._plan = None
        self._closed = True
        os.close(self._w)  # the thread sees end-of-file, closes its end and returns

    def _poke(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self._w, b"!")

    def _run(self) -> None:
        try:
            while True:
                plan = self._plan
                timeout = None if plan is None else max(0.0, plan[0] - time.monotonic())
                readable, _, _ = select.select([self._r], [], [], timeout)
                if readable:
                    if not os.read(self._r, 512):
                        return  # closed
                    continue  # re-read the plan
                plan = self._plan
                if plan is not None and time.monotonic() >= plan[0]:
                    exit_now(plan[1], plan[2])
        finally:
            os.close(self._r)


def exit_now(code: int, reason: str) -> None:
    """Log `reason`, flush what can be flushed within `_LAST_WORDS_S`, then `os._exit(code)`."""

    def last_words() -> None:
        stuck = [
            t.name
            for t in threading.enumerate()
            if t.is_alive() and not t.daemon and t is not threading.main_thread()
        ]
        logger.log(
            logging.WARNING if code == 130 else logging.ERROR,
            "%s; exit %d now%s",
            reason,
            code,
            f" (threads still running: {', '.join(stuck)})" if stuck else "",
        )
        for name in (None, "sf_lifecycle"):
            for handler in logging.getLogger(name).handlers:
                with contextlib.suppress(Exception):
                    handler.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()

    # On its own thread: a logging handler held by a stuck thread must not hold the exit.
    t = threading.Thread(target=last_words, name="sf-last-words", daemon=True)
    t.start()
    t.join(_LAST_WORDS_S)
    os._exit(code)
