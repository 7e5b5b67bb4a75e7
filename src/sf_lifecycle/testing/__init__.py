"""Helpers for testing services built on sf-lifecycle with real processes.

`ServerProcess` starts an app under `sf-lifecycle serve` on a free 127.0.0.1 port and always reaps
it. The library's own integration tests, the demo and the benchmarks use it.
"""

from .process import ServerProcess, free_port, http_get
from .traefik import TraefikProxy, TraefikRouting, find_traefik

__all__ = [
    "ServerProcess",
    "TraefikProxy",
    "TraefikRouting",
    "find_traefik",
    "free_port",
    "http_get",
]
