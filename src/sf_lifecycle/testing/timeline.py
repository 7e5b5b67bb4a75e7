"""The shutdown timeline of a server process, read back from its log.

`sf-lifecycle serve` logs one line per phase change (ARCHITECTURE.md, "The shutdown timeline");
this module turns those lines into named events with their time relative to the signal, so a
test can assert on the order and the timing of a shutdown without sleeping or guessing::

    signal           received SIGTERM: draining ...                      (runner)
    first_503        first 503 health probe served ...                   (health)
    listeners_closed drain delay over after ...; closing listeners ...   (runner)
    in_flight_done   in-flight requests finished ...                     (lifecycle)
    drain_done       queue drained N record(s) in T ms                   (queue)
    hook_done        shutdown hook NAME done in T ms                     (lifecycle)
    budget_exceeded  grace budget ... exceeded / spent                   (runner, lifecycle)
    crash            sf-crashpoint: SIGKILL at POINT                     (crash points)
    exit             exit CODE, T ms after the signal                    (runner)

Log timestamps have millisecond resolution (the CLI's `asctime`); a crash-point line has no
timestamp of its own and takes the one of the line before it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["Timeline", "TimelineEvent", "parse_timeline"]

_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<level>[A-Z]+)\s+(?P<logger>[\w.]+): "
    r"(?P<msg>.*)$"
)
_CRASH = re.compile(r"^sf-crashpoint: SIGKILL at (?P<point>\S+)")
_EVENTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("signal", re.compile(r"^received (?P<sig>SIG\w+): draining")),
    ("first_503", re.compile(r"^first 503 health probe served")),
    ("listeners_closed", re.compile(r"^drain delay over after .*closing listeners")),
    ("in_flight_done", re.compile(r"^in-flight requests finished")),
    ("drain_done", re.compile(r"^queue drained (?P<records>\d+) record")),
    ("hook_done", re.compile(r"^shutdown hook (?P<hook>\S+) done")),
    ("budget_exceeded", re.compile(r"^grace budget")),
    ("exit", re.compile(r"^exit (?P<code>-?\d+), ")),
)


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One phase change seen in the log.

    Attributes:
        name: One of the names in the module docstring.
        at_s: Seconds after the signal was received (before it: negative); when no signal was
            logged, after the first recognised event.
        line: The log message, for assertion messages.
        detail: Named values from the line (`records`, `hook`, `code`, `point`, `sig`).
    """

    name: str
    at_s: float
    line: str
    detail: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Timeline:
    """A server's shutdown as a list of events in log order.

    Attributes:
        events: Every recognised event.
    """

    events: tuple[TimelineEvent, ...]

    @property
    def names(self) -> list[str]:
        """Event names in order, e.g. `["signal", "first_503", "listeners_closed", ...]`."""
        return [e.name for e in self.events]

    def first(self, name: str) -> TimelineEvent | None:
        """The first event called `name`, or None."""
        return next((e for e in self.events if e.name == name), None)

    def last(self, name: str) -> TimelineEvent | None:
        """The last event called `name`, or None."""
        return next((e for e in reversed(self.events) if e.name == name), None)

    def at(self, name: str) -> float | None:
        """Seconds after the signal of the first `name` event, or None when it did not happen."""
        event = self.first(name)
        return None if event is None else event.at_s

    @property
    def first_503_s(self) -> float | None:
        """When the first health probe was answered 503."""
        return self.at("first_503")

    @property
    def listeners_closed_s(self) -> float | None:
        """When the drain delay ended and the listeners were closed."""
        return self.at("listeners_closed")

    @property
    def drain_done_s(self) -> float | None:
        """When the final queue drain finished (the last `queue drained` line)."""
        event = self.last("drain_done")
        return None if event is None else event.at_s

    @property
    def drained_records(self) -> int | None:
        """Records delivered by the last drain, or None when no drain was logged."""
        event = self.last("drain_done")
        return None if event is None else int(event.detail["records"])

    @property
    def crash_point(self) -> str | None:
        """The crash point the process killed itself at, or None."""
        event = self.first("crash")
        return None if event is None else event.detail["point"]

    def __str__(self) -> str:
        return "\n".join(f"{e.at_s * 1000:+8.0f} ms  {e.name:<17} {e.line}" for e in self.events)


def parse_timeline(log: str | Iterable[str]) -> Timeline:
    """Parse a server log (text or lines) into a `Timeline`.

    Lines that are not phase changes are ignored, so the whole log of a process can be passed.
    """
    lines = log.splitlines() if isinstance(log, str) else list(log)
    raw: list[tuple[str, datetime | None, str, dict[str, str]]] = []
    last_ts: datetime | None = None
    for text in lines:
        crash = _CRASH.match(text)
        if crash is not None:
            raw.append(("crash", last_ts, text, crash.groupdict()))
            continue
        m = _LINE.match(text)
        if m is None:
            continue
        ts = datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S,%f")
        last_ts = ts
        msg = m["msg"]
        for name, pattern in _EVENTS:
            hit = pattern.match(msg)
            if hit is not None:
                raw.append((name, ts, msg, {k: v for k, v in hit.groupdict().items() if v}))
                break
    origin = next((ts for name, ts, _, _ in raw if name == "signal"), None)
    if origin is None:
        origin = next((ts for _, ts, _, _ in raw if ts is not None), None)
    events = tuple(
        TimelineEvent(
            name,
            0.0 if ts is None or origin is None else (ts - origin).total_seconds(),
            line,
            detail,
        )
        for name, ts, line, detail in raw
    )
    return Timeline(events)
