from __future__ import annotations

import os
import subprocess
import sys
import time
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
        ("_cli_apps:not_callable", "is a int, not an ASGI app (not callable)"),
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
    proc = _serve("nosuch:app", env={"SF_DRAIN_DELAY": "1", "SF_GRACE_MS": "30000"})
    assert proc.returncode == 6
    assert (
        "SF_DRAIN_DELAY is not a setting and is ignored; did you mean SF_DRAIN_DELAY_MS?"
        in proc.stderr
    )
    assert (
        "SF_GRACE_MS is not a setting and is ignored; did you mean SF_RPC_SHUTDOWN_GRACE_MS?"
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


@pytest.mark.parametrize("flag", ["--state-dir", "--host", "--replica-id", "--grace-ms"])
def test_an_empty_flag_is_one_line_and_exit_2(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--state-dir "$UNSET"` must not serve from the current directory."""
    assert cli.main(["serve", "nosuch:app", flag, ""]) == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err
    assert err == f"sf-lifecycle: invalid {flag}='': is empty; give a value or leave the flag out\n"


def test_serve_leaves_the_environment_and_the_precedence_as_it_found_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`main()` run in a process that lives on: its flags end with it."""
    from sf_lifecycle import Settings

    before = dict(os.environ)
    code = cli.main(["serve", "nosuch:app", "--port", "4712", "--drain-delay-ms", "1s"])
    assert code == ExitCode.APP_NOT_LOADED
    assert dict(os.environ) == before
    s = Settings()
    assert (s.port, s.drain_delay_ms, s.sources()) == (4000, 5000, {})


@pytest.mark.parametrize(
    "argv",
    [["serve"], ["serve", "a:b", "--bogus-flag"], ["serve", "a:b", "--backlog", "0"], ["nope"]],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sf-lifecycle: ")
    assert err.endswith(" --help)\n")


@pytest.mark.parametrize(
    ("argv", "shape", "words"),
    [
        (["check-infra", "--json", "--drain-delay-ms", "5x", "infra"], {"ok": False}, "5x"),
        (["check-infra", "--json"], {"ok": False}, "the following arguments are required"),
        (["queue", "status", "--json"], {}, "--state-dir"),
        (["queue", "status", "--json", "--state-dir", "/tmp", "--bogus"], {}, "--bogus"),
    ],
)
def test_usage_errors_with_json_answer_one_json_object(
    argv: list[str],
    shape: dict[str, object],
    words: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """README: `--json` answers one JSON object on stdout also when the arguments are wrong,
    in the command's error shape, and still exit 2 with the one line on stderr."""
    import json

    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == ExitCode.CONFIG_ERROR
    out, err = capsys.readouterr()
    body = json.loads(out)
    assert body == {**shape, "error": body["error"], "exit": 2}
    assert words in body["error"]
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sf-lifecycle: ")


@pytest.mark.parametrize(
    ("argv", "help_of", "message"),
    [
        (["queue", "status", "--state-dir", "/tmp", "--bogus"], "queue status", None),
        (["serve", "a:b", "--bogus-flag"], "serve", None),
        (["check-infra", "infra", "--bogus"], "check-infra", None),
        (
            ["serve", "a:b", "--limit-concurrency", "0"],
            "serve",
            "argument --limit-concurrency: '0': expected an integer >= 1",
        ),
        (
            ["check-infra", "--drain-delay-ms", "5 s", "infra"],
            "check-infra",
            "argument --drain-delay-ms: not a duration",
        ),
    ],
)
def test_a_usage_error_points_at_the_help_of_its_subcommand_and_names_a_flag_once(
    argv: list[str], help_of: str, message: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.endswith(f"(see sf-lifecycle {help_of} --help)\n"), err
    if message is not None:
        assert err.startswith(f"sf-lifecycle: {message}"), err
    flag = [a for a in argv if a.startswith("--")][-1]
    assert err.count(flag) == 1, err


def _assert_one_line(proc: subprocess.CompletedProcess[str], code: int, start: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(start), proc.stderr


def test_a_log_config_uvicorn_cannot_apply_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "log.json"
    bad.write_text("{not json")
    proc = _serve("_cli_apps:app", "--log-config", str(bad))
    _assert_one_line(proc, 2, f"sf-lifecycle: invalid --log-config='{bad}': not a logging")


def test_tls_files_that_are_not_a_certificate_and_key_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = tmp_path / "bad.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    argv = ["serve", "nosuch:app", "--ssl-keyfile", str(pem), "--ssl-certfile", str(pem)]
    assert cli.main(argv) == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sf-lifecycle: invalid --ssl-certfile/--ssl-keyfile=")
    assert "cannot load the certificate and its key" in err


def test_a_unix_socket_in_a_missing_directory_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nodir" / "sf.sock"
    assert cli.main(["serve", "nosuch:app", "--uds", str(path)]) == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err
    assert err == f"sf-lifecycle: invalid --uds='{path}': no such directory: {path.parent}\n"


def test_a_unix_socket_path_holding_a_file_is_one_line_exit_3_and_the_file_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sf.sock"
    path.write_text("precious")
    assert cli.main(["serve", "_cli_apps:app", "--uds", str(path)]) == ExitCode.STARTUP_FAILED
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"sf-lifecycle: --uds={path}: cannot listen there, it exists and is not")
    assert path.read_text() == "precious"


def _settings_line(proc: subprocess.Popen[str]) -> dict[str, object]:
    import json

    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("SETTINGS "), line
    return dict(json.loads(line.removeprefix("SETTINGS ")))


def _stop(proc: subprocess.Popen[str]) -> str:
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err


def test_environment_fills_what_an_app_pinned_in_code_under_plain_uvicorn() -> None:
    """`uvicorn app:app` with `SF_DRAIN_DELAY_MS=1500` and `Settings(replica_id="a")` in the
    app: the variable applies (the one rule holds without `serve`)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "_cli_pinned:app", "--port", "0"],
        cwd=Path(__file__).parent,
        env={**os.environ, "SF_DRAIN_DELAY_MS": "1500", "SF_REPLICA_ID": "env"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        got = _settings_line(proc)
    finally:
        _stop(proc)
    assert got == {"drain_delay_ms": 1500, "replica_id": "a", "port": 4000}


def test_flags_win_over_code_and_code_over_the_environment_under_serve() -> None:
    """Under `serve`: flags > the app's explicit arguments > SF_*; and the log format the app
    set in code (`log_format="json"`) is the one its log lines use."""
    import json

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sf_lifecycle",
            "serve",
            "_cli_pinned:app",
            "--port",
            "0",
            "--drain-delay-ms",
            "700ms",
        ],
        cwd=Path(__file__).parent,
        env={**os.environ, "SF_DRAIN_DELAY_MS": "1500", "SF_REPLICA_ID": "env"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    head = []
    try:
        got = _settings_line(proc)
        assert proc.stderr is not None
        for line in proc.stderr:  # SIGTERM once it serves (before: exit 3, nothing served)
            head.append(line)
            if "running on" in line:
                break
    finally:
        err = "".join(head) + _stop(proc)
    assert got == {"drain_delay_ms": 700, "replica_id": "a", "port": 0}
    assert proc.returncode == 0, err
    lines = err.strip().splitlines()
    assert any("drain delay over" in line for line in lines), err
    for line in lines:  # every line after the app's import, uvicorn's included, is JSON
        assert isinstance(json.loads(line), dict), line


def test_limit_concurrency_never_fails_the_health_paths_of_a_busy_replica() -> None:
    """Steps: `serve --limit-concurrency 1`, one slow request in flight: another request gets
    503, but livez, healthz and ready answer 200 (a busy pod is neither restarted nor taken
    out of the pool for being busy)."""
    import re
    import threading
    import urllib.error
    import urllib.request

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sf_lifecycle",
            "serve",
            "_cli_slow:app",
            "--port",
            "0",
            "--limit-concurrency",
            "1",
        ],
        cwd=Path(__file__).parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    head = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            head.append(line)
            if "running on" in line:
                break
        match = re.search(r"http://127\.0\.0\.1:(\d+)", "".join(head))
        assert match, "".join(head)
        base = f"http://127.0.0.1:{match[1]}"

        def status(path: str) -> int:
            try:
                with urllib.request.urlopen(base + path, timeout=10) as r:
                    return int(r.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        slow: list[int] = []
        t = threading.Thread(target=lambda: slow.append(status("/slow")))
        t.start()
        time.sleep(0.5)
        busy = {p: status(p) for p in ("/slow", "/api/livez", "/api/healthz", "/api/ready")}
        t.join(timeout=10)
    finally:
        _stop(proc)
    assert slow == [200]
    assert busy == {"/slow": 503, "/api/livez": 200, "/api/healthz": 200, "/api/ready": 200}


def test_a_bad_variable_stops_serve_only_not_the_other_commands() -> None:
    """`check-infra` judges files against the built-in defaults: a bad `SF_*` variable in the
    shell that runs it is not its business (it once failed at import with a traceback)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "SF_DRAIN_DELAY_MS": "soon"}
    cmd = [sys.executable, "-m", "sf_lifecycle"]
    checked = subprocess.run(
        [*cmd, "check-infra", str(root / "infra")], env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    served = subprocess.run(
        [*cmd, "serve", "examples.sf_server:app"], env=env, capture_output=True, text=True
    )
    assert served.returncode == ExitCode.CONFIG_ERROR
    assert served.stderr.count("\n") == 1
    assert "SF_DRAIN_DELAY_MS" in served.stderr
