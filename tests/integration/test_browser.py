"""The example server's live page in real headless Chromium, through real Traefik, across an
upgrade; the page's refusal of an invalid session; a report with hostile text. (The demo's
report is opened in Chromium by `test_upgrade_traefik.py`, on the demo's run.)

Chromium is Debian's (`make chromium`); a missing browser fails these tests, it never skips them.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page

from examples.browser import PageWatch, chromium, open_report
from sf_lifecycle.report import Instant, Requests, UpgradeTimeline, Weights, write_report
from sf_lifecycle.testing import BlueGreenProxy, ServerProcess, free_port

from ._loop import BackgroundLoop

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SESSION = "browser"
#: As in the demo: the old replica ends its drain delay after one 503 probe.
ENV = {"SF_DRAIN_AFTER_PROBES": "1", "SF_DRAIN_DELAY_MS": "5000"}


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserContext]:
    with chromium() as context:
        yield context


class Publisher(BackgroundLoop):
    """A client publishing to the session through Traefik every 100 ms, ids in order."""

    name = "publisher"

    def __init__(self, proxy: BlueGreenProxy) -> None:
        self.proxy = proxy
        self.ids: list[str] = []
        self.failures: list[str] = []
        super().__init__()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.1):
            body = json.dumps({"from": "test", "n": n}).encode()
            try:
                status, _, raw = self.proxy.request(
                    f"/api/session/events?session={SESSION}",
                    method="POST",
                    headers={"content-type": "application/json"},
                    body=body,
                    timeout=5.0,
                )
            except OSError as exc:
                self.failures.append(repr(exc))
            else:
                if status == 201:
                    self.ids.append(json.loads(raw)["id"])
                else:
                    self.failures.append(f"HTTP {status}: {raw[:200]!r}")
            n += 1


def shown(page: Page) -> list[tuple[str, str]]:
    """(id, replica) of every event in the page's list, in order."""
    rows: list[list[str]] = page.eval_on_selector_all(
        "#events li", "els => els.map(e => [e.dataset.id || '', e.dataset.replica || ''])"
    )
    return [(a, b) for a, b in rows]


def click_publish(page: Page, times: int) -> None:
    for _ in range(times):
        before = page.get_attribute("body", "data-published") or ""
        page.click("#publish")
        page.wait_for_function(
            "before => (document.body.dataset.published || '') !== before", arg=before
        )


def seq(event_id: str) -> tuple[int, int]:
    epoch, n = event_id.split("-")
    return int(epoch), int(n)


def test_live_page_shows_every_event_once_across_an_upgrade(browser: BrowserContext) -> None:
    """Steps:

    1. sf-v1 behind real Traefik (blue/green routing, weights sf 100, candidate 0).
    2. Chromium opens the live page through Traefik (`/?session=browser`): its stream opens on
       sf-v1. Events are published by clicking the page's button and by a client through
       Traefik every 100 ms, for the whole test.
    3. The upgrade: sf-v2 starts in the candidate pool on the same state volume, becomes UP,
       the weights go to candidate 100, sf-v1 gets SIGTERM: it drains and closes its stream,
       and the page reconnects (Last-Event-ID, the sticky cookie) to sf-v2. More clicks.
    4. Assert: the page lists every published event exactly once, in publication order; the
       events up to a point were delivered by sf-v1 and all later ones by sf-v2; sf-v1 exited
       0; no publish failed; the page had no console error, no uncaught exception, no failed
       request and no request that left this machine.
    """
    with tempfile.TemporaryDirectory(prefix="sf-browser-") as tmp:
        state = Path(tmp)
        cand_port = free_port()
        with (
            ServerProcess(state_dir=state, env={**ENV, "SF_REPLICA_ID": "sf-v1"}, cwd=ROOT) as v1,
            BlueGreenProxy(v1.url, f"http://127.0.0.1:{cand_port}") as proxy,
        ):
            v1.wait_ready()
            page = browser.new_page()
            watch = PageWatch.on(page)
            page.goto(f"{proxy.url}/?session={SESSION}")
            page.wait_for_selector("#status.open")
            assert page.text_content("#status") == "streaming from sf-v1"

            with Publisher(proxy) as publisher:
                click_publish(page, 3)
                with ServerProcess(
                    state_dir=state, env={**ENV, "SF_REPLICA_ID": "sf-v2"}, port=cand_port, cwd=ROOT
                ) as v2:
                    v2.wait_ready()
                    proxy._poll(
                        lambda: set(proxy.candidate_status().values()) == {"UP"},
                        time.monotonic() + 10,
                        "candidate UP in Traefik",
                    )
                    proxy.set_weights(0, 100)
                    click_publish(page, 2)
                    v1.send_signal(signal.SIGTERM)
                    assert v1.wait(15) == 0, v1.logs()[-3000:]
                    page.wait_for_function(
                        "() => document.getElementById('status').textContent"
                        " === 'streaming from sf-v2'",
                        timeout=10_000,
                    )
                    click_publish(page, 3)
                    time.sleep(0.5)
                    publisher.__exit__()
                    clicked = (page.get_attribute("body", "data-published") or "").split()
                    published = sorted([*publisher.ids, *clicked], key=seq)
                    page.wait_for_function(
                        "last => Array.from(document.querySelectorAll('#events li'))"
                        ".some(e => e.dataset.id === last)",
                        arg=published[-1],
                        timeout=10_000,
                    )
                    events = shown(page)
                    connections = page.eval_on_selector_all(
                        "#connections li", "els => els.map(e => e.dataset.replica)"
                    )
                    problems = watch.problems()
                    # Closing the stream aborts its request: counted only up to here.
                    page.evaluate("() => source.close()")
                    page.close()

    assert publisher.failures == []
    assert len(clicked) == 8
    assert len(publisher.ids) > 20
    assert [event_id for event_id, _ in events] == published
    replicas = [replica for _, replica in events]
    switch = replicas.index("sf-v2")
    assert replicas[:switch] == ["sf-v1"] * switch
    assert switch > 0
    assert replicas[switch:] == ["sf-v2"] * (len(replicas) - switch)
    assert connections == ["sf-v1", "sf-v2"]
    assert problems == []
    assert all(url.startswith(proxy.url) for url in watch.requests), watch.requests


def test_an_invalid_session_shows_the_servers_message_and_stops_retrying(
    browser: BrowserContext,
) -> None:
    """`/?session=a%20b`: the server answers the stream 400 with a message. EventSource gives
    up without saying why; the page asks once more, shows that message, and stops: no request
    every second for ever. (A 5xx or a network error is still retried: the upgrade test.)"""
    with (
        tempfile.TemporaryDirectory(prefix="sf-browser-") as tmp,
        ServerProcess(state_dir=Path(tmp), env={"SF_REPLICA_ID": "sf-v1"}, cwd=ROOT) as server,
    ):
        server.wait_ready()
        page = browser.new_page()
        watch = PageWatch.on(page)
        page.goto(f"{server.url}/?session=a%20b")
        page.wait_for_selector("#status.failed", timeout=10_000)
        page.wait_for_timeout(4000)  # the old page retried every second
        status = page.text_content("#status")
        streams = [u for u in watch.requests if "/api/session/events" in u]
        page_errors = list(watch.page_errors)
        page.close()
    assert status == (
        "stream refused: HTTP 400: invalid session id 'a b': use 1-128 characters from "
        "A-Z a-z 0-9 _ -"
    )
    assert len(streams) == 2, streams  # the EventSource, and the one look at why it failed
    assert page_errors == []


#: Text that ends a `<script>` element early unless every `<` in it is escaped.
HOSTILE = "<!--<script>\"'</script><img src=x onerror=alert(1)>&amp;\u2028\u2029%{x}"


def test_report_data_parses_in_the_browser_whatever_the_text(
    browser: BrowserContext, tmp_path: Path
) -> None:
    """Hostile text in every text field of a report (title, verdict, replicas, failures,
    instants, weights, pools, summary): in Chromium the embedded data still parses with
    JSON.parse to exactly what was written, the chart renders, nothing ran, nothing failed."""
    tl = UpgradeTimeline(HOSTILE, 1_800_000_000.0, verdict=HOSTILE, ok=False)
    tl.requests += [Requests(0.1, "sf-v1"), Requests(0.2, HOSTILE, 1, 1, HOSTILE)]
    tl.instants += [Instant(0.3, HOSTILE, "SIGTERM", HOSTILE)]
    tl.instants += [Instant(0.4, HOSTILE, "SSE reconnect", HOSTILE)]
    tl.weights += [Weights(0.0, {HOSTILE: 100}, HOSTILE)]
    tl.pools = {HOSTILE: HOSTILE}
    tl.summary = [(HOSTILE, HOSTILE)]
    path = write_report(tl, tmp_path / "report.html")
    page = browser.new_page()
    watch = PageWatch.on(page)
    open_report(page, path)
    parsed = page.evaluate(
        "() => { try { return JSON.parse("
        "document.getElementById('sf-report-data').textContent) }"
        " catch (e) { return 'JSON.parse: ' + e.message } }"
    )
    injected = page.evaluate("() => document.querySelectorAll('img[src=x]').length")
    problems = watch.problems()
    page.close()
    assert parsed == json.loads(json.dumps(tl.to_json()))
    assert injected == 0
    assert problems == []
