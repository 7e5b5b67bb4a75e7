"""Helpers for testing services built on sf-lifecycle with real processes.

`ServerProcess` starts an app under `sf-lifecycle serve` on a free 127.0.0.1 port and always reaps
it. The library's own integration tests, the demo and the benchmarks use it.
"""

from .bluegreen import BlueGreenProxy
from .oracle import (
    DeliveryReport,
    LostWrites,
    assert_delivered_once,
    check_delivery,
    sqlite_sink_ids,
)
from .process import ServerProcess, free_port, http_get
from .service import CrashPointMissed, Service, ServiceFactory, Shutdown
from .timeline import Timeline, TimelineEvent, parse_timeline
from .traefik import TraefikProxy, TraefikRouting, find_traefik

__all__ = [
    "BlueGreenProxy",
    "CrashPointMissed",
    "DeliveryReport",
    "LostWrites",
    "ServerProcess",
    "Service",
    "ServiceFactory",
    "Shutdown",
    "Timeline",
    "TimelineEvent",
    "TraefikProxy",
    "TraefikRouting",
    "assert_delivered_once",
    "check_delivery",
    "find_traefik",
    "free_port",
    "http_get",
    "parse_timeline",
    "sqlite_sink_ids",
]
