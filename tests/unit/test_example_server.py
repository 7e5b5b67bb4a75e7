"""The example server's test switch for a bad release: `SF_EXAMPLE_FAIL_RATE`."""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import httpx
import pytest

from sf_lifecycle import ConfigError, Settings


@pytest.fixture(scope="module")
def sf_server(tmp_path_factory: pytest.TempPathFactory) -> types.ModuleType:
    """The example module; importing it builds `app`, which needs a state directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SF_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        return importlib.import_module("examples.sf_server")


@pytest.mark.parametrize(("raw", "rate"), [("", 0.0), ("0", 0.0), ("0.3", 0.3), ("1", 1.0)])
def test_fail_rate_reads_a_share(sf_server: types.ModuleType, raw: str, rate: float) -> None:
    fail_rate = sf_server.fail_rate
    assert fail_rate({"SF_EXAMPLE_FAIL_RATE": raw}) == rate
    assert fail_rate({}) == 0.0


@pytest.mark.parametrize("raw", ["1.5", "-0.1", "nan", "half"])
def test_bad_fail_rate_is_a_start_up_error_naming_the_variable(
    sf_server: types.ModuleType, raw: str
) -> None:
    with pytest.raises(ConfigError, match=r"invalid SF_EXAMPLE_FAIL_RATE=.*between 0 and 1"):
        sf_server.fail_rate({"SF_EXAMPLE_FAIL_RATE": raw})


async def test_hello_fails_for_that_share_and_nothing_else_does(
    sf_server: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_app = sf_server.create_app
    monkeypatch.setenv("SF_EXAMPLE_FAIL_RATE", "1")
    app = create_app(Settings(state_dir=tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/api/hello")
        assert r.status_code == 500
        assert r.json() == {"error": "injected failure (SF_EXAMPLE_FAIL_RATE)"}
        assert (await c.get("/api/slow", params={"seconds": "0"})).status_code == 200
        assert (await c.get("/api/version")).status_code == 200
    monkeypatch.setenv("SF_EXAMPLE_FAIL_RATE", "0")
    app = create_app(Settings(state_dir=tmp_path / "b"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert {(await c.get("/api/hello")).status_code for _ in range(20)} == {200}
