"""Traefik's internal entrypoint as a client: its HTTP API and its `/metrics`.

One client for everything that asks Traefik what it serves: `sf-lifecycle rollout` (weights,
server status, the metrics it gates on) and the test harness (`testing/traefik.py`). Plain stdlib
HTTP with short timeouts: the entrypoint is local, and a rollout must not stall on it.

`TraefikAPIError` (an `OSError`) is an answer other than 200 or 404; a 404 for a service means
"absent" (None). Connection errors are `OSError`s too, so a caller that judges nothing blind
catches one type.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._prometheus import ServiceStats, process_start, service_stats

__all__ = ["FILE_PROVIDER", "Scrape", "TraefikAPI", "TraefikAPIError", "qualify"]

#: The weighted service lives in a file of Traefik's file provider.
FILE_PROVIDER = "file"


def qualify(name: str, provider: str = FILE_PROVIDER) -> str:
    """Traefik's full name of a service referenced from a file: `sf` -> `sf@file`."""
    return name if "@" in name else f"{name}@{provider}"


class TraefikAPIError(OSError):
    """Traefik answered something other than 200 (or 404 for a service: absent).

    Args:
        message: What was asked and the status.
        status: The HTTP status Traefik answered.
        body: The body it answered with (for messages).
    """

    def __init__(self, message: str, status: int = 0, body: bytes = b"") -> None:
        super().__init__(message)
        # Attributes, not args: pickle rebuilds from `(message,)` and restores them.
        self.status = status
        self.body = body


class TraefikAPI:
    """Traefik's internal entrypoint: the API and `/metrics` (stdlib HTTP, short timeouts).

    Args:
        url: Base URL of the entrypoint that serves the API and `/metrics`.
        timeout_s: Timeout of each request.
    """

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def get(self, path: str) -> tuple[int, bytes]:
        """`(status, body)` of a GET of `path`; an HTTP error status is an answer, not raised.

        Raises:
            OSError: Traefik unreachable.
        """
        try:
            with urllib.request.urlopen(self.url + path, timeout=self.timeout_s) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def service(self, name: str) -> dict[str, Any] | None:
        """The API's view of service `name` (`sf@file`), or None when Traefik has no such service.

        Raises:
            TraefikAPIError: any other status than 200 or 404.
        """
        status, body = self.get(f"/api/http/services/{name}")
        if status == 404:
            return None
        if status != 200:
            raise TraefikAPIError(f"Traefik API answered {status} for service {name}", status, body)
        doc: dict[str, Any] = json.loads(body)
        return doc

    def server_status(self, name: str) -> dict[str, str]:
        """Traefik's health view of `name`'s servers: URL -> `UP` / `DOWN` ({} when absent)."""
        svc = self.service(name)
        return dict((svc or {}).get("serverStatus") or {})

    def health_path(self, name: str) -> str | None:
        """The path Traefik's health check of `name` polls (its servers' `SF_HEALTH_PREFIX`
        shows there); None when it has none or is absent."""
        return health_check_path(self.service(name))

    def weights(self, name: str) -> dict[str, int] | None:
        """The weights of weighted service `name`; None when it is absent or disabled."""
        svc = self.service(name)
        if svc is None or svc.get("status") != "enabled":
            return None
        children = (svc.get("weighted") or {}).get("services") or []
        return {str(c["name"]): int(c.get("weight", 1)) for c in children}

    def scrape(self) -> Scrape:
        """One read of `/metrics`.

        Raises:
            OSError: unreachable, or any other status than 200.
        """
        status, body = self.get("/metrics")
        if status != 200:
            raise OSError(f"Traefik's /metrics answered {status}")
        text = body.decode("utf-8", "replace")
        return Scrape(process_start(text), service_stats(text))


def health_check_path(service: Mapping[str, Any] | None) -> str | None:
    """`loadBalancer.healthCheck.path` of a service as Traefik's API shows it, or None."""
    lb = (service or {}).get("loadBalancer") or {}
    path = (lb.get("healthCheck") or {}).get("path") if isinstance(lb, dict) else None
    return path if isinstance(path, str) and path.startswith("/") else None


@dataclass(frozen=True, slots=True)
class Scrape:
    """One read of Traefik's `/metrics`: its start time and the per-service counters."""

    started: float | None
    stats: Mapping[str, ServiceStats]

    def since(self, name: str, earlier: Scrape) -> ServiceStats:
        """`name`'s traffic since `earlier`; all of it when Traefik restarted in between."""
        now = self.stats.get(name, ServiceStats())
        if earlier.started is not None and self.started != earlier.started:
            return now.since(ServiceStats())
        return now.since(earlier.stats.get(name, ServiceStats()))
