"""One session's events as data: the line format of a session file, and retention.

Pure (no I/O, no locks): `FileEventLog` (`_events_file.py`) reads bytes into a `View`, asks
`Retention` what a reader may still get, and writes what `encode_header` and `encode_line`
make (the file layout is drawn in `_events_file.py`). Split from it so that the backend is
the I/O and the concurrency, and what a reader may see is decided here, testable on data.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ._events import Event, lost_event

__all__ = [
    "EMPTY",
    "MAX_NUMBER",
    "Corrupt",
    "Retention",
    "View",
    "encode_header",
    "encode_line",
    "has_after",
    "parse_header",
    "parse_lines",
]

_LINE_RE = re.compile(rb'\{"seq":([0-9]{1,18}),"ts":(-?[0-9]{1,18}),"data":')
_HEADER_KEY = "sf_session_log"
#: Largest epoch or sequence number: ids stay `<18 digits>-<18 digits>`.
MAX_NUMBER = 10**18 - 1


class Corrupt(Exception):
    """Bytes that are not a session file (the reader decides whether to quarantine)."""


@dataclass(slots=True)
class View:
    """A consistent snapshot of one session file; replaced whole on reload or compaction."""

    epoch: int | None  # None: no file
    floor: int
    seqs: list[int]  # appended to in place (after `events`), so readers bisect safely
    events: list[Event]

    @property
    def head(self) -> int:
        return self.seqs[-1] if self.seqs else self.floor


EMPTY = View(None, 0, [], [])


def encode_header(view: View) -> bytes:
    """The header line (without its newline), with a fresh random `gen`: what tells a reader
    that the file under the name is another incarnation, whatever its inode number."""
    return json.dumps(
        {
            _HEADER_KEY: 1,
            "epoch": view.epoch,
            "floor": view.floor,
            "gen": os.urandom(8).hex(),
        },
        separators=(",", ":"),
    ).encode()


def parse_header(line: bytes) -> tuple[int, int]:
    """`(epoch, floor)` of a header line; `Corrupt` when it is not one."""
    try:
        header = json.loads(line)
        epoch, floor = header["epoch"], header["floor"]
        if (
            header.get(_HEADER_KEY) != 1
            or not (isinstance(epoch, int) and 0 <= epoch <= MAX_NUMBER)
            or not (isinstance(floor, int) and 0 <= floor <= MAX_NUMBER)
        ):
            raise ValueError("unexpected header fields")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise Corrupt(f"bad header: {exc}") from None
    return epoch, floor


def encode_line(seq: int, ts_ms: int, data_json: str) -> bytes:
    """One event's line, newline included."""
    return f'{{"seq":{seq},"ts":{ts_ms},"data":{data_json}}}\n'.encode()


def parse_lines(chunk: bytes, view: View, path: Path) -> int:
    """Parse the complete lines of `chunk` into `view`; return the bytes consumed."""
    end = chunk.rfind(b"\n")
    if end < 0:
        return 0
    epoch = view.epoch
    prev = view.head
    new_events: list[Event] = []
    new_seqs: list[int] = []
    pos = 0
    while pos <= end:
        nl = chunk.index(b"\n", pos)
        m = _LINE_RE.match(chunk, pos)
        if m is None or chunk[nl - 1 : nl] != b"}":
            raise Corrupt(f"unparseable line at byte {pos} of the new data in {path.name}")
        seq, ts = int(m.group(1)), int(m.group(2))
        if seq <= prev:
            raise Corrupt(f"sequence {seq} after {prev} in {path.name}")
        try:
            data_json = chunk[m.end() : nl - 1].decode()
            json.loads(data_json)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            raise Corrupt(f"bad data for seq {seq}: {exc}") from None
        new_events.append(Event(f"{epoch}-{seq}", data_json, ts))
        new_seqs.append(seq)
        prev = seq
        pos = nl + 1
    # Events before seqs: a reader bisecting `seqs` never indexes past `events`.
    view.events.extend(new_events)
    view.seqs.extend(new_seqs)
    return end + 1


def has_after(view: View, pos: tuple[int, int] | None) -> bool:
    """Whether `view` holds something a reader at `pos` has not seen (or a reset for it)."""
    if view.epoch is None:
        return False
    if pos is None:
        return bool(view.seqs)
    return pos[0] != view.epoch or view.head != pos[1]


@dataclass(frozen=True, slots=True)
class Retention:
    """What a reader can still get: the newest `events`, younger than `ms`.

    Exact for readers (`floor`, `select`), lazy on disk (`needs_compaction` once a file holds
    25 % more than that, so compaction is amortised).
    """

    events: int
    ms: int

    def floor(self, view: View, now_ms: int) -> int:
        """Highest seq a reader can no longer get, counting retention by number and age."""
        floor = max(view.floor, view.head - self.events)
        cutoff = now_ms - self.ms
        events = view.events
        i, n = 0, len(view.seqs)
        while i < n and events[i].ts_ms < cutoff:
            i += 1
        if i:
            floor = max(floor, view.seqs[i - 1])
        return floor

    def select(
        self,
        view: View,
        last_id: str | None,
        pos: tuple[int, int] | None,
        now_ms: int,
        limit: int | None = None,
    ) -> list[Event]:
        """What `read_after(last_id)` answers from `view` (`pos`: `last_id` parsed); at most
        `limit` events when given, a leading `lost` one included (a stream's batch bound)."""
        if view.epoch is None:
            if pos is None:
                return []
            return [lost_event(None, now_ms, "reset", last_id, None)]
        epoch = view.epoch
        floor = self.floor(view, now_ms)
        out: list[Event] = []
        if pos is None:
            seq = view.floor  # a new client: everything retained, with no notice
            if floor > seq:
                seq = floor
        elif pos[0] != epoch:
            out.append(lost_event(f"{epoch}-{floor}", now_ms, "reset", last_id, None))
            seq = floor
        else:
            seq = pos[1]
            head = view.head
            if seq > head:
                # The log is behind the client (its tail was lost in a crash without fsync).
                return [lost_event(f"{epoch}-{head}", now_ms, "ahead", last_id, None)]
            if seq < floor:
                out.append(lost_event(f"{epoch}-{floor}", now_ms, "expired", last_id, floor - seq))
                seq = floor
        n = len(view.seqs)
        start = bisect.bisect_right(view.seqs, seq, 0, n)
        out.extend(view.events[start : n if limit is None else min(n, start + limit - len(out))])
        return out

    def needs_compaction(self, view: View, now_ms: int) -> bool:
        """True once the file holds 25 % more than retention keeps (by number or by age)."""
        slack = max(1, self.events // 4)
        if len(view.seqs) > self.events + slack:
            return True
        return bool(view.events) and view.events[0].ts_ms < now_ms - self.ms * 5 // 4
