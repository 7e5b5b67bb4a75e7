"""A real server process on a free loopback port, reaped by PID whatever happens."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["ServerProcess", "free_port", "http_get", "reap"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds the listening TCP socket of `port` (None: cannot tell here).

    Free ports are picked before the server binds, so another process can take one in between
    and answer in its place; a test must not mistake that process for its own server.
    """
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    owned: set[str] = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            owned.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            # local address "HEXIP:HEXPORT", state 0A = LISTEN, inode in column 9
            if (
                len(cols) > 9
                and cols[3] == "0A"
                and int(cols[1].rsplit(":", 1)[1], 16) == port
                and f"socket:[{cols[9]}]" in owned
            ):
                return True
    return False


def http_get(
    url_host: str,
    port: int,
    path: str,
    *,
    method: str = "GET",
    timeout: float = 5.0,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection(url_host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def reap(proc: subprocess.Popen[Any], grace_s: float) -> int:
    """SIGTERM `proc`, wait `grace_s`, then SIGKILL; its exit code. Safe on an exited process."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class ServerProcess:
    """`sf-lifecycle serve APP` as a child process on 127.0.0.1.

    Args:
        app: `module:attribute` of the ASGI app.
        state_dir: The state directory (`SF_STATE_DIR`); a new temporary one when None. It
            replaces an inherited `SF_STATE_DIR`.
        env: Extra environment variables (`SF_*` settings, test switches), over everything.
            The child inherits the rest of this process's environment, other `SF_*` included.
        port: Port to bind; a free one when None.
        cwd: Working directory (the app's module must be importable from it).
        args: Extra `serve` arguments.
        plain_uvicorn: Run the app under plain `uvicorn` instead of `sf-lifecycle serve`, as
            a baseline (no drain delay on SIGTERM).

    Use as a context manager: on exit the process gets SIGTERM, then SIGKILL after `reap_s`.
    """

    def __init__(
        self,
        app: str = "examples.sf_server:app",
        *,
        state_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        cwd: Path | None = None,
        args: Sequence[str] = (),
        reap_s: float = 10.0,
        plain_uvicorn: bool = False,
    ) -> None:
        self.plain_uvicorn = plain_uvicorn
        self.app = app
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sf-state-")
            state_dir = Path(self._tmp.name)
        self.state_dir = state_dir
        self.env = dict(env or {})
        self.cwd = cwd or Path.cwd()
        self.args = list(args)
        self.reap_s = reap_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._port_chosen = port is not None
        self._log = tempfile.NamedTemporaryFile(prefix="sf-server-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> ServerProcess:
        # The inherited environment, then the state directory (an argument wins over a
        # `SF_STATE_DIR` the shell exported), then `env` over both.
        env = {
            **os.environ,
            "SF_STATE_DIR": str(self.state_dir),
            **self.env,
            "PYTHONUNBUFFERED": "1",
        }
        if self.plain_uvicorn:
            cmd = [sys.executable, "-m", "uvicorn", self.app, "--log-level", "warning"]
        else:
            cmd = [sys.executable, "-m", "sf_lifecycle", "serve", self.app]
        cmd += ["--host", self.host, "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(
            cmd, cwd=self.cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def get(self, path: str, **kw: object) -> tuple[int, dict[str, str], bytes]:
        return http_get(self.host, self.port, path, **kw)  # type: ignore[arg-type]

    def health_path(self, name: str) -> str:
        """`<prefix>/<name>` (`ready`, `healthz`, ...) under the child's `SF_HEALTH_PREFIX`
        (this object's `env`, else the inherited environment; empty or unset: `/api`)."""
        raw = self.env.get("SF_HEALTH_PREFIX", os.environ.get("SF_HEALTH_PREFIX", "")).strip()
        prefix = "/api" if not raw else "" if raw == "/" else raw
        return f"{prefix}/{name}"

    def wait_ready(self, timeout: float = 15.0, path: str | None = None) -> None:
        """Poll `path` (`<SF_HEALTH_PREFIX>/ready`) until it answers 200; raise with the
        server log if it never does."""
        path = path if path is not None else self.health_path("ready")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError):
                if self.get(path, timeout=1.0)[0] == 200:
                    if self.proc is None or listens_on(self.proc.pid, self.port) is not False:
                        return
                    self._move_to_another_port()
            time.sleep(0.05)
        raise TimeoutError(f"{self.url}{path} not 200 within {timeout} s:\n{self.logs()}")

    def _move_to_another_port(self) -> None:
        """Another process answered on our port (it took the free port first): start again."""
        assert self.proc is not None
        if self._port_chosen:
            raise RuntimeError(f"port {self.port} is served by another process, not the server")
        self.proc.kill()  # it has not bound yet: nothing of it to drain
        self.proc.wait(5)
        self.port = free_port()
        self.start()

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; its exit code (negative: killed by that signal)."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def logs(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def stop(self) -> int | None:
        """SIGTERM, wait up to `reap_s`, then SIGKILL. Safe to call twice."""
        return None if self.proc is None else reap(self.proc, self.reap_s)

    def kill(self) -> None:
        """SIGKILL (what `docker kill` does) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._log.close()
            with contextlib.suppress(OSError):
                os.unlink(self._log.name)
            if self._tmp is not None:
                self._tmp.cleanup()

    def __enter__(self) -> ServerProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
