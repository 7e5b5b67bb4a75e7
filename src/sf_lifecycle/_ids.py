"""Record ids: UUIDv7 as 32 lowercase hex digits, time-ordered within and across processes.

An id is minted when a record is appended, before it is durable, and is the only thing a sink
needs to stay idempotent: a record redelivered after a crash (a file resurrected by a power cut,
a drain cut between the sink's commit and the unlink) carries the same id. The millisecond clock
comes first so ids sort by time; a per-process counter orders ids minted in the same
millisecond (and keeps them ordered if the clock steps back); 62 random bits keep two processes
on one volume apart.
"""

from __future__ import annotations

import os
import re
import threading
import time

__all__ = ["ID_RE", "is_record_id", "new_record_id"]

#: The format `new_record_id` produces: version 7, variant 0b10.
ID_RE = re.compile(r"[0-9a-f]{12}7[0-9a-f]{3}[89ab][0-9a-f]{15}\Z")

_lock = threading.Lock()
_last_ms = 0
_seq = 0


def new_record_id() -> str:
    """A UUIDv7 as 32 hex digits: time-ordered (ms, then a per-process counter), 62 random bits."""
    global _last_ms, _seq
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms <= _last_ms:
            ms = _last_ms
            _seq += 1
            if _seq > 0xFFF:
                ms += 1
                _seq = 0
        else:
            _seq = 0
        _last_ms = ms
        seq = _seq
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    return f"{(ms << 80) | (7 << 76) | (seq << 64) | (2 << 62) | rand:032x}"


def is_record_id(value: object) -> bool:
    """True for a string in the format `new_record_id` produces."""
    return isinstance(value, str) and ID_RE.match(value) is not None
