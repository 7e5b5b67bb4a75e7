"""The one seam between the feedback queue and the file system.

Every `os` call the queue makes on its own files (open, write, fsync, rename, unlink, ftruncate,
close, stat, listdir) is written `_fs.os.<call>` in `_segments`, `_writer`, `_delivery`,
`_recovery` and `queue`, so a test replaces this single name to see or fail all of them:
the fault-injection tests (`tests/reliability/test_io_faults.py`, `tests/unit/test_queue.py`)
fail the N-th call of one kind, and the power-loss test (`tests/reliability/test_power_loss.py`)
mirrors them into a model of what a power cut keeps. Constants (`os.O_*`) and path helpers may
use `os` directly; `_statefiles` (folder checks shared with the event log) is not behind it.
"""

from __future__ import annotations

import os

__all__ = ["os"]
