"""Example 4: headless Chromium for the browser tests and the README's screenshot.

    python -m examples.browser screenshot .demo/report.html docs/report.png

Playwright drives Debian's `chromium` (`make chromium` installs it at /usr/bin/chromium); it never
downloads a browser of its own (`PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1`, no `playwright install`).
Each browser gets a fresh profile directory and the flags that keep it off the network: no
background requests, updates, sync or QUIC, so a page that works here works offline.

`PageWatch` records what a person would notice and a test must assert on: console errors,
uncaught exceptions, failed requests, and any request that left this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import BrowserContext, Page, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Addresses a page may load from: the file itself, inline data, this machine.
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


@contextlib.contextmanager
def chromium(width: int = 1200, height: int = 900) -> Iterator[BrowserContext]:
    """A headless Chromium context with a fresh profile; closed (and its processes ended) after.

    Raises:
        FileNotFoundError: Debian's chromium is not installed (`make chromium`).
    """
    if not CHROMIUM.exists():
        raise FileNotFoundError(
            f"{CHROMIUM} is missing: run `make chromium` (apt-get install chromium) first"
        )
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    with (
        tempfile.TemporaryDirectory(prefix="sf-chromium-") as profile,
        sync_playwright() as pw,
    ):
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            yield context
        finally:
            context.close()


@dataclass
class PageWatch:
    """Everything on `page` that would be a defect: errors, failed or non-local requests."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    remote_requests: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    @classmethod
    def on(cls, page: Page) -> PageWatch:
        watch = cls()
        page.on(
            "console",
            lambda m: (
                watch.console_errors.append(f"{m.text} ({m.location})")
                if m.type == "error"
                else None
            ),
        )
        page.on("pageerror", lambda e: watch.page_errors.append(str(e)))
        page.on(
            "requestfailed",
            lambda r: watch.failed_requests.append(f"{r.method} {r.url}: {r.failure}"),
        )
        page.on("request", watch._request)
        return watch

    def _request(self, request: object) -> None:
        url = str(getattr(request, "url", ""))
        self.requests.append(url)
        parts = urlsplit(url)
        if parts.scheme not in ("file", "data", "blob", "about") and (
            parts.hostname not in LOCAL_HOSTS
        ):
            self.remote_requests.append(url)

    def problems(self) -> list[str]:
        """Every error seen, one line each; empty when the page behaved."""
        return [
            *(f"console error: {e}" for e in self.console_errors),
            *(f"page error: {e}" for e in self.page_errors),
            *(f"request failed: {e}" for e in self.failed_requests),
            *(f"request left this machine: {e}" for e in self.remote_requests),
        ]


def open_report(page: Page, report: Path) -> None:
    """Open a report file and wait until plotly has drawn its chart."""
    page.goto(report.resolve().as_uri())
    page.wait_for_selector(
        "#sf-timeline .main-svg .scatterlayer .trace path", state="attached", timeout=15_000
    )


def screenshot(report: Path, png: Path, width: int = 1000) -> Path:
    """A PNG of the report's heading and chart (what the README shows)."""
    with chromium(width=width, height=900) as context:
        page = context.new_page()
        watch = PageWatch.on(page)
        open_report(page, report)
        page.add_style_tag(content=".modebar{display:none!important}")
        box = page.locator("#sf-timeline").bounding_box()
        assert box is not None
        png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(
            path=str(png), clip={"x": 0, "y": 0, "width": width, "height": box["y"] + box["height"]}
        )
        if watch.problems():
            raise RuntimeError("the report did not render cleanly: " + "; ".join(watch.problems()))
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="headless Chromium: a screenshot of a report")
    sub = p.add_subparsers(dest="command", required=True)
    shot = sub.add_parser("screenshot", help="PNG of a report's chart")
    shot.add_argument("report", type=Path)
    shot.add_argument("png", type=Path)
    shot.add_argument("--width", type=int, default=1000)
    args = p.parse_args(argv)
    out = screenshot(args.report, args.png, args.width)
    print(f"{out} ({out.stat().st_size / 1000:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
