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


def test_state_dir_pointing_at_a_file_exits_2_with_one_line(tmp_path: object) -> None:
    """Issue 11: `SF_STATE_DIR` at a file was a traceback and exit 1."""
    import os
    from pathlib import Path

    a_file = Path(str(tmp_path)) / "not-a-dir"
    a_file.write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "sf_lifecycle", "serve", "examples.sf_server:app"],
        env={**os.environ, "SF_STATE_DIR": str(a_file)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "SF_STATE_DIR" in lines[0]
    assert "not a directory" in lines[0]
