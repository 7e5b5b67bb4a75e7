"""A test's background load: a daemon thread that runs until the `with` block ends."""

from __future__ import annotations

import threading
from typing import Self


class BackgroundLoop:
    """Subclasses define `_run`, which returns once `self._stop` is set."""

    name = "loop"
    #: How long `__exit__` waits for the thread (a request in flight may take its timeout).
    join_s = 15.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.join_s)

    def _run(self) -> None:
        raise NotImplementedError
