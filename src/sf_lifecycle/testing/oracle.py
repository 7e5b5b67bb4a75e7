"""The delivery oracle: did every acknowledged write reach the sink exactly once?

A test collects the ids its server acknowledged (`202 {"id": ...}`), kills and restarts the
server as it likes, stops it, and then asks the oracle. The oracle compares three things:

- the acknowledged ids (what clients were promised),
- the ids in the sink, with multiplicity (what was delivered; a sink keyed by id can never show a
  duplicate, a user's append-only sink can),
- the queue's files under `<state_dir>/feedback/`: a `.draining` file left behind means records
  that were neither delivered nor recovered yet.

and fails with a message that names every lost, duplicated and unknown id, so the failure says
what went wrong without re-running anything.

"Unknown" ids are in the sink but were never acknowledged. A SIGKILL between the fsync and the
response produces exactly that (durable, but the client saw a reset): pass `unacknowledged=N` for
the N writes a test knows were in flight when it killed the server.
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .._errors import SfLifecycleError

__all__ = [
    "DeliveryReport",
    "LostWrites",
    "assert_delivered_once",
    "check_delivery",
    "sqlite_sink_ids",
]

#: Ids listed in full in a failure message; beyond this, a count.
_MAX_LISTED = 50


class LostWrites(SfLifecycleError, AssertionError):
    """The sink does not hold every acknowledged write exactly once.

    An `AssertionError`, so pytest shows it as a test failure with the message in full; an
    `SfLifecycleError` like every exception of the library (the tree is in `_errors`).

    Attributes:
        report: The `DeliveryReport` that failed.
    """

    def __init__(self, report: DeliveryReport) -> None:
        super().__init__(report.describe())
        self.report = report

    def __reduce__(self) -> tuple[type[LostWrites], tuple[DeliveryReport]]:
        return (type(self), (self.report,))


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What the oracle found.

    Attributes:
        acknowledged: Distinct acknowledged ids, in the order first given.
        lost: Acknowledged ids missing from the sink.
        duplicated: Ids delivered more than once, with their count.
        unknown: Ids in the sink that were never acknowledged.
        draining: `.draining` files left in the queue directory.
        quarantined: Files in the queue's quarantine folder (corrupt segments).
        unacknowledged: Unknown ids the test declared acceptable.
    """

    acknowledged: tuple[str, ...]
    lost: tuple[str, ...]
    duplicated: dict[str, int]
    unknown: tuple[str, ...]
    draining: tuple[str, ...]
    quarantined: tuple[str, ...]
    unacknowledged: int = 0

    @property
    def ok(self) -> bool:
        """True when each acknowledged id was delivered once and nothing is left behind."""
        return (
            not self.lost
            and not self.duplicated
            and len(self.unknown) <= self.unacknowledged
            and not self.draining
        )

    def describe(self) -> str:
        """A multi-line summary naming every offending id."""
        n = len(self.acknowledged)
        head = "delivered exactly once" if self.ok else "NOT delivered exactly once"
        lines = [f"{n} acknowledged write(s) {head}:"]
        lines.append(_listing("lost (acknowledged, never delivered)", self.lost))
        lines.append(
            _listing(
                "duplicated (delivered more than once)",
                [f"{i} x{c}" for i, c in self.duplicated.items()],
            )
        )
        allowed = f", {self.unacknowledged} allowed" if self.unacknowledged else ""
        lines.append(_listing(f"unknown (delivered, never acknowledged{allowed})", self.unknown))
        lines.append(_listing("left in .draining (not delivered yet)", self.draining))
        if self.quarantined:
            lines.append(_listing("quarantined (corrupt, kept for an operator)", self.quarantined))
        return "\n".join(lines)


def _listing(what: str, items: Iterable[str]) -> str:
    items = list(items)
    if not items:
        return f"  {what}: none"
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {what}: {len(items)}: {shown}{more}"


def sqlite_sink_ids(path: str | os.PathLike[str]) -> list[str]:
    """Every id in a `SqliteSink` database (table `feedback`); [] when it does not exist yet."""
    db = Path(path)
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return [row[0] for row in conn.execute("SELECT id FROM feedback ORDER BY id")]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def check_delivery(
    acknowledged: Iterable[str],
    *,
    state_dir: str | os.PathLike[str] | None = None,
    delivered: Iterable[str] | None = None,
    unacknowledged: int = 0,
) -> DeliveryReport:
    """Compare acknowledged ids with the sink and the queue directory; never raises on a miss.

    Args:
        acknowledged: Ids the server acknowledged during the test (duplicates are ignored).
        state_dir: The server's state directory: its `feedback/` folder is checked for
            `.draining` files, and when `delivered` is None the default sink
            `<state_dir>/feedback.sqlite3` is read.
        delivered: Ids in the sink, one entry per delivery, when the app uses its own sink.
        unacknowledged: How many unknown ids are acceptable (writes in flight at a kill).

    Raises:
        ValueError: neither `state_dir` nor `delivered` was given.
    """
    if delivered is None:
        if state_dir is None:
            raise ValueError("pass state_dir= (default SQLite sink) or delivered= (your sink)")
        delivered = sqlite_sink_ids(Path(state_dir) / "feedback.sqlite3")
    acked = tuple(dict.fromkeys(acknowledged))
    counts = Counter(delivered)
    acked_set = set(acked)
    draining: tuple[str, ...] = ()
    quarantined: tuple[str, ...] = ()
    if state_dir is not None:
        folder = Path(state_dir) / "feedback"
        if folder.is_dir():
            draining = tuple(sorted(p.name for p in folder.glob("*.draining")))
        quarantine = folder / "quarantine"
        if quarantine.is_dir():
            quarantined = tuple(sorted(p.name for p in quarantine.iterdir()))
    return DeliveryReport(
        acknowledged=acked,
        lost=tuple(i for i in acked if i not in counts),
        duplicated={i: c for i, c in counts.items() if c > 1},
        unknown=tuple(sorted(i for i in counts if i not in acked_set)),
        draining=draining,
        quarantined=quarantined,
        unacknowledged=unacknowledged,
    )


def assert_delivered_once(
    acknowledged: Iterable[str],
    *,
    state_dir: str | os.PathLike[str] | None = None,
    delivered: Iterable[str] | None = None,
    unacknowledged: int = 0,
) -> DeliveryReport:
    """Like `check_delivery`, but raise `LostWrites` (an AssertionError) unless all is well.

    Call it after the last server process stopped (`terminate_and_wait`), so no drain is still
    running and the sink is final.

    Returns:
        The report, for further assertions (e.g. on `quarantined`).
    """
    __tracebackhide__ = True  # pytest: show the message, not this frame
    report = check_delivery(
        acknowledged, state_dir=state_dir, delivered=delivered, unacknowledged=unacknowledged
    )
    if not report.ok:
        raise LostWrites(report)
    return report
