"""Health routes: `/api/healthz`, `/api/ready`, `/api/livez`, `/api/version` (and `/metrics`
when enabled).

`healthz` is what the proxy and the Kubernetes readiness probe poll: 200 only while a request
routed here cannot fail for a reason a sibling replica does not have. It answers 503 while
starting, from the moment SIGTERM lands (draining), while start-up recovery has not succeeded
(keyed feedback answers 503 "recovering" meanwhile) and while a readiness check fails; `reasons`
says which. `ready` answers from the same decision with the checks' details, for an operator or
a blue/green script. `livez` is for a liveness probe: 503 only when the event loop is stalled
(`_liveness`), never while draining or recovering, so a restart never cuts a drain short.
`version` says what is running.

There is one way to serve them: `LifecycleMiddleware` (installed by `Lifecycle.install`, or
wrapped around any ASGI app) answers the paths with `HealthEndpoints` before the app's
router sees the request. This module knows the lifecycle only as a type, so it imports nothing
that imports it back.

The prefix (`/api`) is a setting (`SF_HEALTH_PREFIX`), so the paths of one `HealthEndpoints` are
in `paths`. They are not routes of the app: a FastAPI app's OpenAPI schema does not list them,
deliberately (they are the operator's, not the API's, and no router sees them). The Prometheus
metrics path (`SF_METRICS_PATH`, off by default) is served the same way, by `sf_lifecycle.metrics`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._config import package_version
from ._problem import method_not_allowed
from ._state import Phase

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle

__all__ = ["HEALTH_PATHS", "HealthEndpoints", "health_paths", "route_path"]

logger = logging.getLogger("sf_lifecycle.health")

HEALTHZ, READY, VERSION = "/api/healthz", "/api/ready", "/api/version"
LIVEZ = "/api/livez"
#: The paths under the default prefix, `/api`.
HEALTH_PATHS = frozenset({HEALTHZ, READY, LIVEZ, VERSION})


def health_paths(prefix: str) -> tuple[str, str, str]:
    """`(healthz, ready, version)` under `prefix` (`Settings.health_prefix`, `""` for the root);
    `livez` is `<prefix>/livez`."""
    return f"{prefix}/healthz", f"{prefix}/ready", f"{prefix}/version"


_NO_STORE = {"cache-control": "no-store"}


def route_path(scope: Scope) -> str:
    """The path the app routes on: the request's path without the ASGI `root_path`.

    Under `--root-path /svc` uvicorn hands `/svc/api/healthz` with `root_path` `/svc` (the ASGI
    spec's full path); the health routes answer it as `/api/healthz`, as Starlette's router
    would.
    """
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def _json(status: int, body: dict[str, Any], head: bool) -> Response:
    payload = json.dumps(body, separators=(",", ":")).encode()
    response = Response(payload, status, headers=_NO_STORE, media_type="application/json")
    if head:
        response.body = b""  # keep content-length of the GET body, as HTTP asks for HEAD
    return response


class HealthEndpoints:
    """Plain ASGI for the three health paths (and only those), for the middleware to call."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self._logged_first_503 = False
        settings = lifecycle.settings
        healthz, ready, version = health_paths(settings.health_prefix)
        handlers: dict[str, Any] = {
            healthz: self.healthz,
            ready: self.ready,
            f"{settings.health_prefix}/livez": self.livez,
            version: self.version,
        }
        if settings.metrics_path is not None:
            settings.require_metrics_extra()  # one ConfigError naming it, not an ImportError
            from .metrics import MetricsEndpoint  # the `metrics` extra

            handlers[settings.metrics_path] = MetricsEndpoint(lifecycle)
        self._handlers = handlers
        #: Every path answered here (the middleware's lookup set).
        self.paths = frozenset(handlers)

    async def healthz(self, request: Request) -> Response:
        state = self.lifecycle.state
        phase = state.phase
        body: dict[str, Any] = {
            "status": "ok" if phase is Phase.READY else "unavailable",
            "phase": str(phase),
            "in_flight": state.in_flight,
            # [[seconds, count], ...] oldest first; `sf-lifecycle rollout` counts a candidate's
            # requests that run longer than its latency limit, which Traefik cannot see yet.
            "in_flight_ages_s": [[round(a, 3), n] for a, n in state.in_flight_ages()],
            "streams": state.streams,
        }
        if phase is Phase.STARTING:
            # Starting replicas take traffic only once ready; the proxy waits for a 200.
            status = 503
            body["reasons"] = ["replica is starting"]
        elif phase is Phase.READY:
            ready, why = await self.lifecycle.readiness()
            status = 200
            if not ready:
                # Recovery unfinished or a check failing: a request routed here could fail
                # where a sibling's would not. Not counted as a drain probe.
                status = 503
                body["status"] = "unavailable"
                body["reasons"] = why.get("reasons", [])
        else:
            body["reasons"] = [f"replica is {phase}"]
            status = 503
            draining_for = state.seconds_in(Phase.DRAINING)
            body["draining_for_s"] = round(draining_for or 0.0, 3)
            n = state.note_probe_503()
            body["probes_503"] = n
            if n == 1:
                logger.info(
                    "first 503 health probe served %.0f ms after draining began",
                    (draining_for or 0.0) * 1000,
                )
        return _json(status, body, request.method == "HEAD")

    async def ready(self, request: Request) -> Response:
        ok, body = await self.lifecycle.readiness()
        body["status"] = "ready" if ok else "not ready"
        return _json(200 if ok else 503, body, request.method == "HEAD")

    async def livez(self, request: Request) -> Response:
        alive, body = self.lifecycle.heartbeat.status()
        body["phase"] = str(self.lifecycle.state.phase)
        return _json(200 if alive else 503, body, request.method == "HEAD")

    async def version(self, request: Request) -> Response:
        s = self.lifecycle.settings
        lc = self.lifecycle
        body = {
            "version": s.version or package_version(),
            "commit": s.git_sha,
            "replica": s.replica_id,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lc.started_wall)),
            "uptime_s": round(time.monotonic() - lc.started_monotonic, 3),
        }
        return _json(200, body, request.method == "HEAD")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._handlers[route_path(scope)]
        if scope["method"] not in ("GET", "HEAD"):
            response = method_not_allowed(scope["method"], "GET, HEAD")
        else:
            response = await handler(Request(scope, receive))
        await response(scope, receive, send)
