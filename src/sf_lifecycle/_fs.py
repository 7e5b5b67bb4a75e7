"""The one seam between the feedback queue and the file system.

Every `os` call the queue makes on its own files (open, write, fsync, rename, unlink, ftruncate,
close, stat, listdir) goes through this module's `os` name, written out and looked up at each
use (`_fs.os.fsync(fd)`, never a local `os = _fs.os` alias), in `_segments`, `_writer`,
`_delivery`, `_recovery` and `_queue`. A test replaces this single name to see or fail all of
them: the fault-injection tests (`tests/reliability/test_io_faults.py`,
`tests/unit/test_queue.py`) fail the N-th call of one kind, and the power-loss test
(`tests/reliability/test_power_loss.py`) mirrors them into a model of what a power cut keeps.
`tests/unit/test_fs.py` checks that no queue module calls the real `os` directly or binds a
local `os`. Not behind it: record ids (`os.urandom`), and `_statefiles`, the folder checks
shared with the event log.
"""

from __future__ import annotations

import os

__all__ = ["os"]
