"""The Traefik harness against real Traefik: a SIGTERMed replica drains out of the pool cleanly."""

from __future__ import annotations

import http.client
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from sf_lifecycle.testing import ServerProcess, TraefikProxy, TraefikRouting

from ._loop import BackgroundLoop

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DRAIN_DELAY_S = 3.0
RATE_PER_S = 20.0
ENV = {
    "SF_DRAIN_DELAY_MS": str(int(DRAIN_DELAY_S * 1000)),
    "SF_DRAIN_AFTER_PROBES": "1",
    "SF_RPC_SHUTDOWN_GRACE_MS": "20000",
}
#: For replicas that are only stopped at the end of a test: no need to wait out a drain delay.
QUICK_STOP = {"SF_DRAIN_DELAY_MS": "100"}


@dataclass
class Sent:
    started: float
    sticky: bool
    status: int | None
    replica: str | None
    cookie_set: str | None
    error: str | None = None


class Load(BackgroundLoop):
    """Sequential GETs through the proxy at a fixed rate, alternating an anonymous client and a
    sticky one that keeps whatever `sf-aff` cookie Traefik last gave it."""

    name = "load"

    def __init__(self, proxy: TraefikProxy, cookie: str) -> None:
        self.proxy = proxy
        self.cookie = cookie
        self.sent: list[Sent] = []
        super().__init__()

    def _run(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            sticky = n % 2 == 1
            headers = {"Cookie": self.cookie} if sticky else {}
            started = time.monotonic()
            try:
                status, h, _ = self.proxy.request("/api/hello", headers=headers, timeout=5.0)
            except (OSError, http.client.HTTPException) as exc:
                self.sent.append(Sent(started, sticky, None, None, None, repr(exc)))
            else:
                new_cookie = self.proxy.sticky_cookie(h)
                if sticky and new_cookie:
                    self.cookie = new_cookie
                self.sent.append(Sent(started, sticky, status, h.get("x-sf-replica"), new_cookie))
            n += 1
            next_at += 1 / RATE_PER_S
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def test_sigterm_leaves_traefik_pool_without_failed_requests() -> None:
    """Steps:

    1. Start replicas `a` and `b` of the example app (drain delay 3 s, drain after 1 probe) and
       real Traefik in front with the reference routing (health check every 2 s, `sf-aff`).
    2. Pin a client with the sticky cookie; check its flags and that it always hits one replica,
       while cookie-less requests reach both.
    3. Run 20 requests/s through Traefik (half of them sticky), then SIGTERM the pinned replica.
    4. Wait for Traefik's API to report it DOWN, and for it to exit.
    5. Keep the load for another second, stop it.
    6. Assert: no failed request; the replica left the pool within one health interval plus
       timeout and exited 0 within the drain delay + 1 s; nothing reached it afterwards; the
       sticky client was re-pinned to the live replica and stayed there.
    """
    routing = TraefikRouting()
    assert routing == TraefikRouting.from_file(ROOT / "infra/traefik/dynamic")
    with (
        ServerProcess(env={**ENV, "SF_REPLICA_ID": "a"}, cwd=ROOT) as a,
        ServerProcess(env={**ENV, "SF_REPLICA_ID": "b"}, cwd=ROOT) as b,
    ):
        a.wait_ready()
        b.wait_ready()
        replicas = {"a": a, "b": b}
        with TraefikProxy([a.url, b.url], routing=routing) as proxy:
            assert proxy.server_status() == {a.url: "UP", b.url: "UP"}

            # 2. Pin a client.
            status, headers, _ = proxy.request("/api/hello")
            assert status == 200
            assert "HttpOnly" in headers["set-cookie"]
            assert "SameSite=Lax" in headers["set-cookie"]
            cookie = proxy.sticky_cookie(headers)
            assert cookie is not None
            assert cookie.startswith("sf-aff=")
            pinned = headers["x-sf-replica"]
            for _ in range(6):
                status, headers, _ = proxy.request("/api/hello", headers={"Cookie": cookie})
                assert (status, headers["x-sf-replica"]) == (200, pinned)
            anonymous = {proxy.request("/api/hello")[1]["x-sf-replica"] for _ in range(6)}
            assert anonymous == {"a", "b"}, "Traefik should balance cookie-less requests"
            victim = replicas[pinned]
            live = "b" if pinned == "a" else "a"

            # 3-5. Load, SIGTERM, observe.
            with Load(proxy, cookie) as load:
                time.sleep(1.0)
                victim.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                to_down = proxy.wait_status({victim.url: "DOWN"}, timeout=DRAIN_DELAY_S + 2)
                down_at = signalled + to_down
                exit_code = victim.wait(DRAIN_DELAY_S + 5)
                to_exit = time.monotonic() - signalled
                time.sleep(1.0)

            # 6. Assertions.
            sent = load.sent
            failed = [s for s in sent if s.status != 200]
            assert failed == [], (
                f"{len(failed)} of {len(sent)} failed: {failed[:5]}\n{proxy.logs()}"
            )
            assert len(sent) >= RATE_PER_S * 3, len(sent)
            assert exit_code == 0, victim.logs()
            interval = 2.0 + 1.0  # the routing's health interval + timeout
            assert to_down <= interval + 0.5, to_down
            assert to_exit <= DRAIN_DELAY_S + 1.0, (to_exit, victim.logs())
            # Traefik's view agrees with what clients saw.
            before = [s for s in sent if s.started < signalled]
            after = [s for s in sent if s.started > down_at + 0.2]
            assert len(after) >= 10, len(after)
            assert {s.replica for s in before if s.sticky} == {pinned}
            assert {s.replica for s in after} == {live}
            # The sticky client got a new cookie once, and kept landing on the live replica.
            repins = [s for s in sent if s.sticky and s.cookie_set]
            assert len(repins) == 1, repins
            assert repins[0].replica == live
            assert all(
                s.replica == live for s in sent if s.sticky and s.started > repins[0].started
            )
            assert load.cookie != cookie
            status, headers, _ = proxy.request("/api/hello", headers={"Cookie": load.cookie})
            assert (status, headers["x-sf-replica"]) == (200, live)
        assert proxy.proc is not None
        assert proxy.proc.poll() is not None


def test_set_backends_reconfigures_the_pool_and_reaps_traefik() -> None:
    """Steps:

    1. Start Traefik with an empty pool: requests get 404 (no router), the API lists nothing.
    2. `set_backends([a])`: returns once the API lists `a`; requests reach `a`.
    3. `set_backends([a, b])`, wait for both `UP`; then `set_backends([b])`: `a` is gone from
       Traefik's view and from the responses.
    4. Leaving the context stops Traefik and reaps it; its config directory is removed.
    """
    with (
        ServerProcess(env={**QUICK_STOP, "SF_REPLICA_ID": "a"}, cwd=ROOT) as a,
        ServerProcess(env={**QUICK_STOP, "SF_REPLICA_ID": "b"}, cwd=ROOT) as b,
        TraefikProxy() as proxy,
    ):
        assert proxy.request("/api/hello")[0] == 404
        assert proxy.server_status() == {}
        a.wait_ready()
        b.wait_ready()

        proxy.set_backends([a.url])
        assert set(proxy.server_status()) == {a.url}
        status, headers, _ = proxy.request("/api/hello")
        assert (status, headers["x-sf-replica"]) == (200, "a")

        proxy.set_backends([a.url, b.url])
        proxy.wait_status({a.url: "UP", b.url: "UP"}, timeout=5)
        proxy.set_backends([b.url])
        assert proxy.server_status() == {b.url: "UP"}
        assert {proxy.request("/api/hello")[1]["x-sf-replica"] for _ in range(4)} == {"b"}
        with pytest.raises(TimeoutError, match="last status seen"):
            proxy.wait_status({a.url: "UP"}, timeout=0.3)
        config_dir = proxy.config_dir
        assert (config_dir / "dynamic" / "sf.yaml").is_file()
        assert [p.name for p in (config_dir / "dynamic").iterdir()] == ["sf.yaml"]
    assert proxy.proc is not None
    assert proxy.proc.returncode is not None
    assert not config_dir.exists()


def test_traefik_start_failure_is_reported_with_its_log() -> None:
    """A Traefik that cannot bind its port exits; `start` raises with the log and reaps it."""
    with TraefikProxy() as first:
        second = TraefikProxy(port=first.port)
        with pytest.raises(RuntimeError, match="traefik exited"):
            second.start(timeout=10)
        assert second.proc is not None
        assert second.proc.returncode is not None
