"""The process's lifecycle phase: starting -> ready -> draining -> stopped.

One `ShutdownState` per process, created by `Lifecycle` and passed to whatever needs it; tests make
their own. Phases only move forward, so a reader never sees `ready` after `draining`.

Reads are plain attribute loads (safe from any thread under the GIL and free on the request path).
Transitions take a lock and wake async waiters through `call_soon_threadsafe`, so a phase change
made from a worker thread or a signal-driven callback reaches coroutines on any event loop.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Phase", "PhaseChange", "ShutdownState"]


class Phase(enum.IntEnum):
    """Ordered phases; comparisons (`phase >= Phase.DRAINING`) follow the lifecycle."""

    STARTING = 0
    READY = 1
    DRAINING = 2
    STOPPED = 3

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class PhaseChange:
    """When a phase began: monotonic time for durations, wall time for humans."""

    phase: Phase
    monotonic: float
    wall: float


class ShutdownState:
    """Thread-safe phase machine with awaitable transitions.

    Besides the phase it carries the few counters the health routes report and the runner acts
    on: requests in flight, open streams, health probes answered 503, and whether the listeners
    have closed (the moment open streams must end).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        now = PhaseChange(Phase.STARTING, time.monotonic(), time.time())
        self._history: dict[Phase, PhaseChange] = {Phase.STARTING: now}
        self._phase = Phase.STARTING
        self._waiters: list[tuple[Phase, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._closing: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.closing = False
        #: Monotonic time of `begin_closing()` (the drain delay's end), for the metrics.
        self.closing_at: float | None = None
        #: HTTP requests being served, health probes and streams excluded (the middleware counts).
        self.in_flight = 0
        #: Open event streams (SSE), reported but not counted as in flight.
        self.streams = 0
        #: Health probes answered 503 since draining began.
        self.probes_503 = 0
        #: Monotonic time of each 503 probe, in order; the runner reads the N-th.
        self.probe_503_times: list[float] = []
        #: Requests in flight per generation, for `in_flight_ages`: the middleware counts each
        #: request into the generation current when it began (a dict lookup, no allocation).
        self.generation = 0
        self.open_by_generation: dict[int, int] = {0: 0}
        self._generation_began: dict[int, float] = {0: time.monotonic()}

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def serving(self) -> bool:
        """True while the proxy should route traffic here (ready, not yet draining)."""
        return self._phase is Phase.READY

    def since(self, phase: Phase) -> PhaseChange | None:
        """When `phase` began, or None if it has not been reached."""
        return self._history.get(phase)

    def seconds_in(self, phase: Phase) -> float | None:
        """Seconds since `phase` began (None if not reached)."""
        change = self._history.get(phase)
        return None if change is None else time.monotonic() - change.monotonic

    def advance(self, phase: Phase) -> bool:
        """Move forward to `phase` (skipping is allowed). Returns False if already there or past.

        Safe from any thread; never call it from a signal handler (it takes a lock): schedule it
        on the loop instead.
        """
        with self._lock:
            if phase <= self._phase:
                return False
            self._phase = phase
            self._history[phase] = PhaseChange(phase, time.monotonic(), time.time())
            ready = [w for w in self._waiters if w[0] <= phase]
            self._waiters = [w for w in self._waiters if w[0] > phase]
        for _, loop, fut in ready:
            _wake(loop, fut)
        return True

    def mark_ready(self) -> bool:
        return self.advance(Phase.READY)

    def begin_draining(self) -> bool:
        return self.advance(Phase.DRAINING)

    def mark_stopped(self) -> bool:
        return self.advance(Phase.STOPPED)

    async def wait_for(self, phase: Phase) -> PhaseChange:
        """Wait until the process reaches `phase` (or a later one), then say when it began."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._phase < phase:
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((phase, loop, fut))
            else:
                fut = loop.create_future()
                fut.set_result(None)
        await fut
        reached = self._history.get(phase)
        # A skipped phase (starting -> draining) reports the phase that replaced it.
        return reached if reached is not None else self._history[self._phase]

    def in_flight_ages(self) -> list[tuple[float, int]]:
        """How long the requests in flight have been running: (seconds, count), oldest first.

        Each call starts a new generation. A request counted in generation g began before
        generation g + 1 did, so its age is at least the time since then (the value given):
        a lower bound, exact to the interval between two calls. Traefik's metrics see a
        request only once it ends; this is how a rollout sees the ones that hang. Call it on
        the event loop that serves the requests (the health route does).
        """
        now = time.monotonic()
        opened, began = self.open_by_generation, self._generation_began
        for g in [g for g, n in opened.items() if n <= 0 and g != self.generation]:
            del opened[g], began[g]
        self.generation += 1
        opened[self.generation], began[self.generation] = 0, now
        gens = sorted(g for g, n in opened.items() if n > 0)
        nexts = sorted(began)
        return [(now - began[nexts[nexts.index(g) + 1]], opened[g]) for g in gens]

    def note_probe_503(self) -> int:
        """Record a health probe answered 503 while draining; returns how many so far."""
        with self._lock:
            self.probes_503 += 1
            self.probe_503_times.append(time.monotonic())
            return self.probes_503

    def begin_closing(self) -> bool:
        """The drain delay is over and the listeners close: open streams must end now."""
        with self._lock:
            if self.closing:
                return False
            self.closing = True
            self.closing_at = time.monotonic()
            events, self._closing = self._closing, []
        for loop, event in events:
            _set_event(loop, event)
        return True

    async def wait_closing(self) -> None:
        """Wait until `begin_closing()`; event streams use this to say goodbye in time."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._lock:
            if self.closing:
                return
            self._closing.append((loop, event))
        try:
            await event.wait()
        finally:
            with self._lock:
                if (loop, event) in self._closing:
                    self._closing.remove((loop, event))


def _wake(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
    def resolve() -> None:
        if not fut.done():
            fut.set_result(None)

    _call_on(loop, resolve)


def _set_event(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    _call_on(loop, event.set)


def _call_on(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """Run `fn` on `loop`: now if we are on it, else at its next turn (thread-safe)."""
    if loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn()
    else:
        loop.call_soon_threadsafe(fn)
