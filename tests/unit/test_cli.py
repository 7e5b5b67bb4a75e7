from __future__ import annotations

import subprocess
import sys

import pytest

from sf_lifecycle import cli


@pytest.fixture(autouse=True)
def private_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    # `serve` writes its flags into os.environ (for the app it imports): keep that per test.
    import os

    monkeypatch.setattr(os, "environ", os.environ.copy())


def test_bad_flag_value_names_its_variable_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SF_PORT", raising=False)
    code = cli.main(["serve", "examples.sf_server:app", "--port", "eighty"])
    assert code == 2
    err = capsys.readouterr().err
    assert "SF_PORT" in err
    assert "'eighty'" in err


def test_flags_become_environment_for_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_serve(app: str, **kw: object) -> int:
        import os

        seen["app"] = app
        seen["env"] = {k: os.environ.get(k) for k in ("SF_STATE_DIR", "SF_DRAIN_DELAY_MS")}
        return 0

    for var in ("SF_STATE_DIR", "SF_DRAIN_DELAY_MS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("sf_lifecycle.runner.serve", fake_serve)
    code = cli.main(["serve", "pkg.mod:app", "--state-dir", "/tmp/s", "--drain-delay-ms", "1234"])
    assert code == 0
    assert seen == {
        "app": "pkg.mod:app",
        "env": {"SF_STATE_DIR": "/tmp/s", "SF_DRAIN_DELAY_MS": "1234"},
    }


def test_module_entry_point_prints_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sf_lifecycle", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0
    assert "serve" in proc.stdout
