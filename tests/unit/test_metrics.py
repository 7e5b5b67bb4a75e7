"""`sf_lifecycle.metrics` in process, and the Grafana dashboard that reads it."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from sf_lifecycle import ConfigError, Lifecycle, Settings
from sf_lifecycle._state import Phase
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


async def test_a_metrics_port_already_bound_is_one_warning_not_a_failed_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every gunicorn worker reads the same SF_METRICS_PORT: the second must still start (a
    # worker failing to boot makes the master exit), serving without the port.
    with socket.socket() as sibling:
        sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sibling.bind(("127.0.0.1", 0))
        sibling.listen()
        port = sibling.getsockname()[1]
        lc = Lifecycle(Settings(state_dir=tmp_path, metrics_port=port, port=0))
        app = lc.install(Starlette())
        with caplog.at_level(logging.WARNING, logger="sf_lifecycle.lifecycle"):
            async with started(app):
                assert lc.state.phase is Phase.READY
        warned = [r.getMessage() for r in caplog.records if "already in use" in r.getMessage()]
        assert len(warned) == 1
        assert f"metrics port 127.0.0.1:{port} is already in use" in warned[0]
        assert "SF_METRICS_PATH" in warned[0]


def test_metrics_without_the_extra_is_a_config_error_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    for name, raw in [("SF_METRICS_PATH", "/metrics"), ("SF_METRICS_PORT", "9464")]:
        settings = Settings.from_env({name: raw})
        with pytest.raises(
            ConfigError, match=rf"^invalid {name}=.*pip install 'sf-lifecycle\[metrics\]'$"
        ):
            settings.require_metrics_extra()
        with pytest.raises(ConfigError, match=name):
            Lifecycle(settings)  # at the app's import, before anything binds
    Settings().require_metrics_extra()  # nothing asked, nothing needed
