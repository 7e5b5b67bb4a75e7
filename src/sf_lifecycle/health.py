"""Health routes: `/api/healthz`, `/api/ready`, `/api/version`.

`healthz` is what the proxy polls: 200 while this replica should receive traffic, 503 from the
moment SIGTERM lands. `ready` is stricter (start-up work done, every check passing) and is what an
operator or a blue/green script waits for before moving traffic. `version` says what is running.

Usable as Starlette routes (`health_routes(lifecycle)`) or as a plain ASGI app (`HealthApp`) in
front of any other ASGI app.
"""

from __future__ import annotations

import json
import logging
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .lifecycle import Lifecycle
from .state import Phase

__all__ = ["HEALTH_PATHS", "HealthApp", "health_routes"]

logger = logging.getLogger("sf_lifecycle.health")

HEALTHZ, READY, VERSION = "/api/healthz", "/api/ready", "/api/version"
HEALTH_PATHS = frozenset({HEALTHZ, READY, VERSION})
_NO_STORE = {"cache-control": "no-store"}


def _package_version() -> str:
    try:
        return _dist_version("sf-lifecycle")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def _json(status: int, body: dict[str, Any], head: bool) -> Response:
    payload = json.dumps(body, separators=(",", ":")).encode()
    response = Response(payload, status, headers=_NO_STORE, media_type="application/json")
    if head:
        response.body = b""  # keep content-length of the GET body, as HTTP asks for HEAD
    return response


class _Endpoints:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self._logged_first_503 = False

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
        elif phase is Phase.READY:
            status = 200
        else:
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

    async def version(self, request: Request) -> Response:
        s = self.lifecycle.settings
        lc = self.lifecycle
        body = {
            "version": s.version or _package_version(),
            "commit": s.git_sha,
            "replica": s.replica_id,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lc.started_wall)),
            "uptime_s": round(time.monotonic() - lc.started_monotonic, 3),
        }
        return _json(200, body, request.method == "HEAD")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Plain ASGI for the three paths, so the middleware answers them without a router."""
        handler = {HEALTHZ: self.healthz, READY: self.ready, VERSION: self.version}[scope["path"]]
        if scope["method"] not in ("GET", "HEAD"):
            body = {"error": f"method {scope['method']} not allowed; use GET or HEAD"}
            response = _json(405, body, head=False)
            response.headers["allow"] = "GET, HEAD"
        else:
            response = await handler(Request(scope, receive))
        await response(scope, receive, send)


def health_routes(lifecycle: Lifecycle) -> list[BaseRoute]:
    """Starlette routes for the three health endpoints, to put in your app's route list."""
    ep = _Endpoints(lifecycle)
    methods = ["GET", "HEAD"]
    return [
        Route(HEALTHZ, ep.healthz, methods=methods),
        Route(READY, ep.ready, methods=methods),
        Route(VERSION, ep.version, methods=methods),
    ]


class HealthApp:
    """Plain ASGI: answers the health paths, hands everything else to `app` (or 404s)."""

    def __init__(self, lifecycle: Lifecycle, app: ASGIApp | None = None) -> None:
        self.lifecycle = lifecycle
        self.app = app
        self._endpoints = _Endpoints(lifecycle)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in HEALTH_PATHS:
            await self._endpoints(scope, receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await _json(404, {"error": "not found"}, head=False)(scope, receive, send)
