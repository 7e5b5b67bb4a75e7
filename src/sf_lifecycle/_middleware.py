"""In-flight middleware: counts requests being served and steers keep-alive traffic away.

Pure ASGI, so it costs one closure and four integer updates per request (measured in
`benchmarks/bench_middleware.py`). It never rejects a request because the replica is draining: the
proxy decides where traffic goes, and a request that still arrives is served.

While draining it adds `Connection: close` to each response, so the proxy's pooled keep-alive
connections to this replica end after their current response instead of being reused later, when
the listener is gone. With a replica id configured every response carries `X-SF-Replica`.

It is also the one way to serve the health paths (`/api/healthz`, `/api/ready`, `/api/version`):
it answers them itself, before the wrapped app's router. A route list with the health routes in
front costs every application request about 1.3 us of failed route matching; a set lookup here
costs nothing measurable. Wrapped around an app that is not Starlette (`LifecycleMiddleware(app,
lifecycle)`) it gives any ASGI app the same health endpoints and drain.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._health import HealthEndpoints, route_path
from ._state import Phase

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle

__all__ = ["DEFAULT_STREAM_PATHS", "LifecycleMiddleware"]

#: Long-lived streams: reported by the SSE layer, not counted as in flight.
DEFAULT_STREAM_PATHS = frozenset({"/api/session/events"})

_CONNECTION_CLOSE = (b"connection", b"close")
# Looking up an enum member on its class costs ~55 ns on CPython 3.11; a module global ~10 ns.
_DRAINING = Phase.DRAINING


class LifecycleMiddleware:
    """Answer the health paths, count in-flight HTTP requests, add `Connection: close` while
    draining.

    Args:
        app: The application to wrap, any ASGI app.
        lifecycle: The process lifecycle whose state is read and counted into.
        exclude_paths: Paths not counted as in flight (event streams), passed to `app`. The
            health paths (under `settings.health_prefix`) and the metrics path are always
            answered here and never counted.
    """

    def __init__(
        self,
        app: ASGIApp,
        lifecycle: Lifecycle,
        exclude_paths: Iterable[str] = DEFAULT_STREAM_PATHS,
    ) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self._state = lifecycle.state
        self._health = HealthEndpoints(lifecycle)
        # One set lookup per request, as before the paths became settings: the health and
        # metrics paths are in it, and answered here.
        self._health_paths = self._health.paths
        self._exclude = frozenset(exclude_paths) | self._health_paths
        replica = lifecycle.settings.replica_id
        self._replica = (b"x-sf-replica", replica.encode("latin-1")) if replica else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        state = self._state
        replica = self._replica

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Copies, never in-place edits: the app may reuse its message and header list.
                if state._phase >= _DRAINING:
                    headers = [
                        h for h in message.get("headers", ()) if h[0].lower() != b"connection"
                    ]
                    if replica is not None:
                        headers.append(replica)
                    headers.append(_CONNECTION_CLOSE)
                    message = {**message, "headers": headers}
                elif replica is not None:
                    message = {**message, "headers": [*message.get("headers", ()), replica]}
            await send(message)

        path = route_path(scope)
        if path in self._exclude:
            if path in self._health_paths:
                await self._health(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
            return
        # Counted per generation too, so /api/healthz can say how old the oldest request is.
        gen = state.generation
        opened = state.open_by_generation
        opened[gen] += 1
        state.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            state.in_flight -= 1
            opened[gen] -= 1
