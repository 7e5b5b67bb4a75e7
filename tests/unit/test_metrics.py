"""`sf_lifecycle.metrics` in process, and the Grafana dashboard that reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from sf_lifecycle import Lifecycle, Settings
from sf_lifecycle.metrics import METRIC_NAMES, registry_for
from sf_lifecycle.testing import started

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "sf-lifecycle.json"


def test_every_metric_name_is_exposed_and_nothing_else() -> None:
    from prometheus_client import generate_latest

    lifecycle = Lifecycle(Settings())
    text = generate_latest(registry_for(lifecycle)).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names == set(METRIC_NAMES)


async def test_metrics_path_is_off_by_default_and_served_when_set(tmp_path: Path) -> None:
    off = Lifecycle(Settings()).install(Starlette())
    on_lc = Lifecycle(Settings(metrics_path="/internal/metrics"))
    on = on_lc.install(Starlette())
    async with started(off), started(on):
        t_off = httpx.ASGITransport(app=off)
        t_on = httpx.ASGITransport(app=on)
        async with httpx.AsyncClient(transport=t_off, base_url="http://t") as c:
            assert (await c.get("/metrics")).status_code == 404
        async with httpx.AsyncClient(transport=t_on, base_url="http://t") as c:
            r = await c.get("/internal/metrics")
            assert r.status_code == 200
            assert "sf_phase 1.0" in r.text
            assert (await c.post("/internal/metrics")).status_code == 405
            # Not counted as a request in flight, like a health probe.
            assert on_lc.state.in_flight == 0


def test_dashboard_is_valid_json_and_uses_only_exposed_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert len(exprs) >= len(board["panels"]) > 0
    used = {
        re.sub(r"_total$", "", name) for e in exprs for name in re.findall(r"\bsf_[a-z0-9_]+", e)
    }
    assert used <= set(METRIC_NAMES), used - set(METRIC_NAMES)
    # Every metric has a panel.
    assert used == set(METRIC_NAMES)
