from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sf_lifecycle import _cli as cli
from sf_lifecycle._runner import ExitCode


@pytest.fixture(autouse=True)
def private_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    # `serve` writes its flags into os.environ (for the app it imports): keep that per test.
    import os

    monkeypatch.setattr(os, "environ", os.environ.copy())


def test_bad_flag_value_names_the_flag_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SF_PORT", raising=False)
    code = cli.main(["serve", "examples.sf_server:app", "--port", "eighty"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("sf-lifecycle: invalid --port='eighty': ")
    assert len(err.strip().splitlines()) == 1


def test_bad_variable_value_names_the_variable_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SF_DRAIN_DELAY_MS", "5 seconds")
    code = cli.main(["serve", "examples.sf_server:app"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("sf-lifecycle: invalid SF_DRAIN_DELAY_MS='5 seconds': ")
    assert "500ms, 5s, 2m" in err


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sf_lifecycle", "serve", *args],
        cwd=Path(__file__).parent,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("nosuch:app", "app 'nosuch:app': no module named 'nosuch'"),
        ("_cli_apps:nope", "app '_cli_apps:nope': module _cli_apps has no attribute 'nope'"),
        ("_cli_raising:app", "importing _cli_raising raised RuntimeError('no database URL')"),
        ("_cli_apps", "expected module:attribute"),
    ],
)
def test_an_app_that_cannot_be_loaded_is_one_line_and_exit_6(spec: str, words: str) -> None:
    """Steps: `serve` a missing module, a missing attribute, a module whose import raises, a
    spec without `:`: one line on stderr naming the problem, no traceback, exit 6."""
    proc = _serve(spec)
    assert proc.returncode == ExitCode.APP_NOT_LOADED, proc.stderr
    assert int(ExitCode.APP_NOT_LOADED) == 6
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sf-lifecycle: app "), lines[0]
    assert words in lines[0]


def test_debug_prints_the_traceback_of_a_failing_import() -> None:
    proc = _serve("_cli_raising:app", "--debug")
    assert proc.returncode == 6
    assert "Traceback" in proc.stderr
    assert 'raise RuntimeError("no database URL")' in proc.stderr


def test_a_mistyped_variable_is_warned_with_the_closest_name() -> None:
    proc = _serve("nosuch:app", env={"SF_DRAIN_DELAY": "1"})
    assert proc.returncode == 6
    assert (
        "SF_DRAIN_DELAY is not a setting and is ignored; did you mean SF_DRAIN_DELAY_MS?"
        in proc.stderr
    )


def test_missing_tls_file_names_the_flag(tmp_path: Path) -> None:
    proc = _serve("nosuch:app", "--ssl-keyfile", str(tmp_path / "k.pem"), "--ssl-certfile", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"sf-lifecycle: invalid --ssl-keyfile='{tmp_path / 'k.pem'}': no such file"
    )


def test_version_matches_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sf-lifecycle {version('sf-lifecycle')}"


def test_help_describes_every_subcommand_and_the_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, text in cli._HELP.items():
        assert f"{name} {' '.join(text.split())}" in out
    for code in ExitCode:
        assert f"{int(code)} " in out


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


def test_a_metrics_port_in_use_is_one_line_and_exit_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        monkeypatch.setenv("SF_METRICS_PORT", str(port))
        code = cli.main(["serve", "examples.sf_server:app", "--host", "127.0.0.1", "--port", "0"])
    assert code == ExitCode.STARTUP_FAILED
    assert int(code) == 3  # README, exit codes
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"sf-lifecycle: SF_METRICS_PORT={port}: cannot listen on 127.0.0.1:{port} for metrics "
        "(Address already in use); choose a free port (exit 3)"
    ]


def test_a_metrics_port_equal_to_the_port_flag_names_both_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SF_METRICS_PORT", "4712")
    code = cli.main(["serve", "examples.sf_server:app", "--port", "4712"])
    assert code == ExitCode.CONFIG_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [
        "sf-lifecycle: invalid SF_METRICS_PORT=4712: must differ from the app's port "
        "(--port=4712); use e.g. 9464"
    ]


def test_metrics_without_the_extra_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    monkeypatch.setenv("SF_METRICS_PATH", "/metrics")
    code = cli.main(["serve", "examples.sf_server:app", "--port", "0"])
    assert code == ExitCode.CONFIG_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [
        "sf-lifecycle: invalid SF_METRICS_PATH='/metrics': Prometheus metrics need the metrics "
        "extra: pip install 'sf-lifecycle[metrics]'"
    ]
