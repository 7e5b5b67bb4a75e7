"""Prometheus metrics of one replica; needs the `metrics` extra (`sf-lifecycle[metrics]`).

Turn them on with a setting, no code: `SF_METRICS_PATH=/metrics` serves them on the app's own
port (answered by the middleware, like the health routes), `SF_METRICS_PORT=9464` on a port of
their own (a thread started with the lifecycle, on `SF_HOST`), or both. The port keeps
answering after the listeners close, while in-flight requests finish and the shutdown hooks
(the final queue drain) run; the path stops with the listeners.

Deliberate choices:

* **Nothing is added to the request path.** The library keeps plain integer counters
  (`ShutdownState`, `Lifecycle.stats`, each queue's) whether or not this module is imported;
  `LifecycleCollector` turns them into metric families only when Prometheus scrapes, so every
  gauge is computed at scrape time (`benchmarks/bench_middleware.py` measures the middleware
  with metrics on against off).
* **One process, one set of metrics.** `sf-lifecycle serve` runs one process per replica, so
  the numbers of a scrape are the replica's. Running several processes of one app (gunicorn
  workers) gives each its own counters. The workers share one environment, so one
  `SF_METRICS_PORT` is bound by the first worker only (the others warn and serve without it,
  `Lifecycle`); `SF_METRICS_PATH` answers for whichever worker took the connection.
  prometheus_client's multiprocess mode is not used: it aggregates values written to files at
  each update, which these gauges (computed from live state at scrape time) never are.
* The queue gauges cover this process's own files (`sf_queue_bytes`, the oldest record's age,
  read from the first record of its oldest file); dead peers' files are counted in
  `sf_queue_orphaned_files` until recovery delivers them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from . import _fs
from ._config import package_version
from ._framing import HEADER_SIZE, MAX_PAYLOAD
from ._segments import list_segments
from ._state import Phase

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle
    from ._queue import FeedbackQueue

__all__ = [
    "METRIC_NAMES",
    "LifecycleCollector",
    "MetricsEndpoint",
    "registry_for",
    "start_metrics_server",
]

logger = logging.getLogger("sf_lifecycle.metrics")

#: Every metric family this module exposes (counters without their `_total` suffix); the
#: Grafana dashboard in `infra/grafana/` uses only these (a test checks it).
METRIC_NAMES = (
    "sf_info",
    "sf_phase",
    "sf_requests_in_flight",
    "sf_shutdown_step_seconds",
    "sf_health_probes_503",
    "sf_queue_depth_records",
    "sf_queue_draining_files",
    "sf_queue_orphaned_files",
    "sf_queue_quarantined_files",
    "sf_queue_bytes",
    "sf_queue_oldest_record_age_seconds",
    "sf_queue_delivered_records",
    "sf_queue_recovered_records",
    "sf_queue_quarantined",
    "sf_queue_rejected_records",
    "sf_sink_errors",
    "sf_startup_retries",
    "sf_sse_streams_open",
    "sf_sse_streams_opened",
    "sf_sse_events_sent",
    "sf_sse_resumes",
    "sf_sse_lost_events",
    "sf_feedback_idempotent_replays",
)

_LENGTH = struct.Struct("<I")


def _first_record_ms(path: Any) -> int | None:
    """The append time (`ts`, ms) of the first record of a segment file; None if unreadable."""
    try:
        fd = _fs.os.open(path, _fs.os.O_RDONLY | _fs.os.O_NOFOLLOW | _fs.os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = _fs.os.pread(fd, HEADER_SIZE, 0)
        if len(head) < HEADER_SIZE:
            return None
        (length,) = _LENGTH.unpack_from(head, 4)
        if length > MAX_PAYLOAD:
            return None
        envelope = json.loads(_fs.os.pread(fd, length, HEADER_SIZE))
        ts = envelope.get("ts") if isinstance(envelope, dict) else None
        return ts if isinstance(ts, int) else None
    except (OSError, ValueError):
        return None
    finally:
        _fs.os.close(fd)


def _queue_files(queue: FeedbackQueue) -> tuple[int, float | None]:
    """(bytes, age in seconds of the oldest record) of this queue's own segment files."""
    try:
        own = list_segments(queue.dir).get(queue.token, [])
    except OSError:
        return 0, None
    total, oldest = 0, None
    for _, _, path in own:
        try:
            size = _fs.os.stat(path, follow_symlinks=False).st_size
        except OSError:
            continue
        total += size
        if oldest is None and size >= HEADER_SIZE:
            oldest = _first_record_ms(path)
    age = None if oldest is None else max(0.0, time.time() - oldest / 1000)
    return total, age


class LifecycleCollector(Collector):
    """Every metric of one `Lifecycle`, computed from its counters when Prometheus scrapes."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    def collect(self) -> Iterator[Metric]:
        lc = self.lifecycle
        state, stats, settings = lc.state, lc.stats, lc.settings
        info = GaugeMetricFamily(
            "sf_info", "What runs here (always 1).", labels=["version", "replica"]
        )
        info.add_metric([settings.version or package_version(), settings.replica_id or ""], 1)
        yield info
        yield GaugeMetricFamily(
            "sf_phase",
            "Lifecycle phase: 0 starting, 1 ready, 2 draining, 3 stopped.",
            value=int(state.phase),
        )
        yield GaugeMetricFamily(
            "sf_requests_in_flight",
            "HTTP requests being served (health probes and event streams excluded).",
            value=state.in_flight,
        )
        yield self._shutdown_steps()
        yield CounterMetricFamily(
            "sf_health_probes_503",
            "Health probes answered 503 while draining.",
            value=state.probes_503,
        )
        yield from self._queues(stats.queues)
        yield CounterMetricFamily(
            "sf_startup_retries",
            "Start-up tasks (orphan recovery) retried after a failure.",
            value=stats.startup_retries,
        )
        yield GaugeMetricFamily("sf_sse_streams_open", "Open SSE streams.", value=state.streams)
        for name, doc, value in (
            ("sf_sse_streams_opened", "SSE streams opened.", stats.streams_opened),
            ("sf_sse_events_sent", "SSE events sent (lost events included).", stats.events_sent),
            ("sf_sse_resumes", "SSE streams opened with a Last-Event-ID.", stats.stream_resumes),
            (
                "sf_sse_lost_events",
                "`lost` events sent: resume positions older than retention.",
                stats.lost_events,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)

    def _shutdown_steps(self) -> Metric:
        """Seconds spent in each shutdown step so far (0 before it began; grows while it runs)."""
        lc, now = self.lifecycle, time.monotonic()
        state, stats = lc.state, lc.stats
        family = GaugeMetricFamily(
            "sf_shutdown_step_seconds",
            "Seconds spent in each shutdown step so far: drain_delay (signal to listeners "
            "closed), in_flight (to the hooks), hooks, total (signal to stopped).",
            labels=["step"],
        )
        draining = state.since(Phase.DRAINING)
        stopped = state.since(Phase.STOPPED)
        began = None if draining is None else draining.monotonic
        closing, hooks, hooks_end = state.closing_at, stats.hooks_began, stats.hooks_ended

        def span(start: float | None, end: float | None) -> float:
            return 0.0 if start is None else max(0.0, (end if end is not None else now) - start)

        family.add_metric(["drain_delay"], span(began, closing))
        family.add_metric(["in_flight"], span(closing, hooks))
        family.add_metric(["hooks"], span(hooks, hooks_end))
        family.add_metric(["total"], span(began, None if stopped is None else stopped.monotonic))
        return family

    def _queues(self, queues: list[FeedbackQueue]) -> Iterator[Metric]:
        depth = draining = orphaned = quarantined_files = size = 0
        delivered = recovered = quarantined = rejected = sink_errors = replays = 0
        oldest: float | None = None
        for q in queues:
            try:
                s = q.stats()
            except Exception:  # the folder cannot be listed: /api/ready says why
                logger.debug("queue stats unavailable for the metrics", exc_info=True)
            else:
                depth += s.queued
                draining += s.draining
                orphaned += s.orphaned
                quarantined_files += s.quarantined
            nbytes, age = _queue_files(q)
            size += nbytes
            if age is not None:
                oldest = age if oldest is None else max(oldest, age)
            delivered += q._delivery.delivered
            quarantined += q._delivery.quarantined
            rejected += q._delivery.rejected
            sink_errors += q._delivery.sink_errors
            recovered += q._recovery.recovered
            replays += q.idempotent_replays
        for name, doc, value in (
            ("sf_queue_depth_records", "Acknowledged records in the active segment.", depth),
            ("sf_queue_draining_files", "This process's files waiting for the sink.", draining),
            ("sf_queue_orphaned_files", "Dead peers' files not yet recovered.", orphaned),
            ("sf_queue_quarantined_files", "Files in the quarantine folder.", quarantined_files),
            ("sf_queue_bytes", "Bytes of this process's segment files on disk.", size),
            (
                "sf_queue_oldest_record_age_seconds",
                "Age of the oldest record in this process's files (0 when empty).",
                oldest or 0.0,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
            ("sf_queue_delivered_records", "Records the sink committed.", delivered),
            ("sf_queue_recovered_records", "Dead peers' records delivered.", recovered),
            ("sf_queue_quarantined", "Files moved to quarantine.", quarantined),
            (
                "sf_queue_rejected_records",
                "Records the sink can never store, set aside in quarantine.",
                rejected,
            ),
            ("sf_sink_errors", "Sink calls that raised or timed out (retried).", sink_errors),
            (
                "sf_feedback_idempotent_replays",
                "Keyed writes answered with the id stored earlier.",
                replays,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)


def registry_for(lifecycle: Lifecycle) -> CollectorRegistry:
    """A registry holding only this lifecycle's collector (made once per lifecycle).

    Add your own collectors to it, or register `LifecycleCollector(lifecycle)` in yours.
    """
    registry: CollectorRegistry | None = getattr(lifecycle, "_metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(LifecycleCollector(lifecycle))
        lifecycle._metrics_registry = registry  # type: ignore[attr-defined]
    return registry


class MetricsEndpoint:
    """The handler of `SF_METRICS_PATH` (`GET`/`HEAD`, checked by the health endpoints): the
    text exposition of `registry_for(lifecycle)`.

    The collection runs in a worker thread: it lists the queue folder and reads one record.
    """

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.registry = registry_for(lifecycle)

    async def __call__(self, request: Request) -> Response:
        body = await asyncio.to_thread(generate_latest, self.registry)
        response = Response(
            body, 200, headers={"cache-control": "no-store"}, media_type=CONTENT_TYPE_LATEST
        )
        if request.method == "HEAD":
            response.body = b""
        return response


def start_metrics_server(
    lifecycle: Lifecycle, port: int, host: str
) -> tuple[Any, threading.Thread]:
    """Serve `registry_for(lifecycle)` on `host:port` in a daemon thread; returns (server,
    thread): `server.shutdown()` stops it. `Lifecycle` calls it when `metrics_port` is set."""
    server, thread = _start_http_server(port, host, registry=registry_for(lifecycle))
    logger.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread
