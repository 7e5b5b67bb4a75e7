"""A `FeedbackQueue`'s files for tests and benchmarks in one process, without the append path.

Building a queue of a million records through `append` takes minutes of fsyncs; a benchmark of
the drain or of orphan recovery wants that queue ready in a second, every round. So:
`write_segment` writes a file the queue reads as one segment (framed as `append` frames
records), once; `link_segments` hard-links such files into a queue's folder, as its own
segments (what `FeedbackQueue.drain` delivers) or as a dead owner's (what `recover` delivers),
so the masters stay for the next round. `crash_queue` leaves a live queue's files as SIGKILL
would, for a recovery without a process to kill (across processes, `Service.kill_*` does it
for real).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._framing import encode
from .._segments import new_token, segment_path

if TYPE_CHECKING:
    from .._queue import FeedbackQueue

__all__ = ["crash_queue", "link_segments", "write_segment"]


def write_segment(path: str | os.PathLike[str], payloads: Iterable[bytes]) -> Path:
    """Write `payloads` to `path` framed as the queue frames them; the path.

    Each payload is one record's JSON envelope as the queue stores it:
    `{"id": "<32 hex digits of a UUIDv7>", "ts": <ms>, "data": {...}}`, UTF-8. The file is
    written, not fsynced: it is a fixture, not a write anyone was promised.
    """
    path = Path(path)
    with open(path, "wb") as f:
        f.write(b"".join([encode(p) for p in payloads]))
    return path


def link_segments(
    queue: FeedbackQueue, files: Sequence[str | os.PathLike[str]], *, orphaned: bool = False
) -> list[Path]:
    """Hard-link `files` (from `write_segment`) into `queue`'s folder as whole segments.

    By default they become `queue`'s own segments 1..N, delivered by `queue.drain`: call it
    before the queue's first `append`, whose segment would otherwise take one of their numbers.
    With `orphaned=True` they become the `.draining` files of a dead owner (a token no live
    queue holds), delivered by `queue.recover` or any queue's sweep.
    The queue unlinks a link once delivered; `files` stay, on the same file system as the
    state directory. Returns the links made.
    """
    # The queue's own naming, so these files are exactly what it would have written.
    token = new_token() if orphaned else queue.token
    links = []
    for seq, master in enumerate(files, 1):
        link = segment_path(queue.dir, token, seq)
        if orphaned:  # a dead owner's rotated segment (no live queue holds this token)
            link = link.with_suffix(".draining")
        os.link(master, link)
        links.append(link)
    return links


def crash_queue(queue: FeedbackQueue) -> None:
    """Stop `queue` as SIGKILL would: its files stay as they are and its lock is free.

    Every acknowledged append stays in its `.log`; nothing is drained, truncated or unlinked, and
    no close callback runs. `queue` is closed; another queue on the same state directory sees its
    files as a dead owner's and recovers them.
    """
    queue._simulate_crash()
