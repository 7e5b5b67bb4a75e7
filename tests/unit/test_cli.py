from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sf_lifecycle import _cli as cli


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
    monkeypatch.setattr("sf_lifecycle._runner.serve", fake_serve)
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


def _unusable_state_dir(kind: str, base: Path) -> tuple[Path, str]:
    """A state directory `serve` cannot use, and the words its one-line error must contain."""
    if kind == "proc":  # a pseudo file system: no file can be created in it, even by root
        return Path("/proc/1"), "cannot create a file in it"
    state = base / "state"
    state.mkdir()
    if kind == "feedback-file":
        (state / "feedback").write_text("x")
        return state, "'feedback' in the state directory is a regular file"
    if kind == "sessions-file":
        (state / "sessions").write_text("x")
        return state, "'sessions' in the state directory is a regular file"
    (state / "feedback").symlink_to(base)
    return state, "'feedback' in the state directory is a symbolic link"


@pytest.mark.parametrize("kind", ["feedback-file", "sessions-file", "feedback-link", "proc"])
def test_an_unusable_state_dir_exits_2_with_one_line(kind: str, tmp_path: Path) -> None:
    """Steps: `serve` with a state directory whose `feedback`/`sessions` is a file or a link,
    or one on a file system where nothing can be created (`/proc/1`): exit 2 and one line
    naming `SF_STATE_DIR` and the problem. Before the fix: a traceback out of the app's
    import (`UnsafePath`, `FileNotFoundError`) and exit 1."""
    state, words = _unusable_state_dir(kind, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "sf_lifecycle", "serve", "examples.sf_server:app"],
        env={**os.environ, "SF_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"sf-lifecycle: invalid SF_STATE_DIR='{state}': "), lines[0]
    assert words in lines[0], lines[0]
    if kind != "proc":
        assert sorted(p.name for p in state.iterdir()) == sorted(
            ["feedback"] if kind.startswith("feedback") else ["sessions"]
        )  # nothing created, nothing left behind (the write probe is removed)
