"""What stops a background task that must never die, and what is only a failure of one attempt.

Start-up recovery (retried until it succeeds), the queue's drainer and its orphan sweep live as
long as the process. They call code the application supplies (the sink), and that code can raise
any `BaseException`, not only `Exception`:

- `CancelledError` that nobody sent to this task: the sink awaited a future another task
  cancelled, or raised it itself. Re-raised, it ends the task as if the shutdown had stopped it,
  silently: no retry, readiness not told, the final drain then trips over the dead task.
- `SystemExit` and `KeyboardInterrupt`: raised inside a task, asyncio lets them escape the event
  loop and the process ends at once, with no drain and exit 0. A real Ctrl-C or SIGTERM never
  arrives this way under the runner (its signal handlers stay installed until the process is
  gone); raised here, it is code in a sink giving up.

So every long-lived loop catches `BaseException` around one attempt and asks `stops_task()`:
only a cancellation of *this* task (`Task.cancelling()`), or the coroutine being closed, ends
it; anything else is logged, retried with backoff and reported, like any other failure.
"""

from __future__ import annotations

import asyncio

__all__ = ["stops_task"]


def stops_task(exc: BaseException) -> bool:
    """True when `exc`, caught in a long-lived task, must end it; False when it is a failure of
    the attempt that raised it (log it, retry, report it).

    Call it from the `except` clause, in the task itself: it reads the current task's pending
    cancellation requests.
    """
    if isinstance(exc, GeneratorExit):
        return True  # the coroutine is being closed; it must not run on
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
