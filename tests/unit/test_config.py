from __future__ import annotations

from pathlib import Path

import pytest

from sf_lifecycle import ConfigError, Settings
from sf_lifecycle._config import ENV_VARS


def test_defaults_match_the_reference_deployment() -> None:
    s = Settings.from_env({})
    assert s.grace_ms == 600_000
    assert s.drain_delay_ms == 5_000
    assert s.drain_after_probes is None
    assert s.drain_margin_ms == 500
    assert s.state_dir is None
    assert s.feedback_max_bytes == 65_536


def test_environment_is_read() -> None:
    env = {
        "SF_RPC_SHUTDOWN_GRACE_MS": "2000",
        "SF_DRAIN_DELAY_MS": "1500",
        "SF_DRAIN_AFTER_PROBES": "1",
        "SF_DRAIN_MARGIN_MS": "250",
        "SF_STATE_DIR": "/tmp/x",
        "SF_VERSION": "1.2.3",
        "SF_GIT_SHA": "abc123",
        "SF_REPLICA_ID": "blue-1",
    }
    s = Settings.from_env(env)
    assert (s.grace_ms, s.drain_delay_ms, s.drain_after_probes, s.drain_margin_ms) == (
        2000,
        1500,
        1,
        250,
    )
    assert s.state_dir == Path("/tmp/x")
    assert (s.version, s.git_sha, s.replica_id) == ("1.2.3", "abc123", "blue-1")


def test_explicit_arguments_win_over_environment() -> None:
    s = Settings.from_env({"SF_DRAIN_DELAY_MS": "1500"}, drain_delay_ms=300)
    assert s.drain_delay_ms == 300


def test_blank_variables_mean_default() -> None:
    assert Settings.from_env({"SF_DRAIN_DELAY_MS": "  "}).drain_delay_ms == 5_000


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("SF_RPC_SHUTDOWN_GRACE_MS", "ten minutes", "an integer from 0"),
        ("SF_RPC_SHUTDOWN_GRACE_MS", "-1", "an integer from 0"),
        ("SF_DRAIN_DELAY_MS", "1.5", "an integer"),
        ("SF_DRAIN_AFTER_PROBES", "0", "an integer from 1"),
        ("SF_PORT", "70000", "to 65535"),
        ("SF_REPLICA_ID", "a b", "characters"),
        ("SF_REPLICA_ID", "x" * 129, "1-128"),
        ("SF_VERSION", "1.0/../x", "characters"),
    ],
)
def test_bad_values_name_the_variable_value_and_what_is_allowed(
    var: str, value: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    message = str(info.value)
    assert var in message
    assert fragment in message
    assert info.value.variable == var


def test_drain_delay_longer_than_budget_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"SF_DRAIN_DELAY_MS.*grace budget"):
        Settings.from_env({"SF_DRAIN_DELAY_MS": "9000", "SF_RPC_SHUTDOWN_GRACE_MS": "1000"})


@pytest.mark.parametrize(("delay", "grace"), [("2000", "2000"), ("0", "0")])
def test_drain_delay_equal_to_the_budget_is_refused(delay: str, grace: str) -> None:
    """The budget counts from the signal and includes the drain delay: a delay that fills it
    leaves nothing for in-flight requests and the final drain (every shutdown exited 4)."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SF_DRAIN_DELAY_MS": delay, "SF_RPC_SHUTDOWN_GRACE_MS": grace})
    assert info.value.variable == "SF_DRAIN_DELAY_MS"
    assert "must be shorter than the grace budget" in str(info.value)
    assert Settings(drain_delay_ms=1999, grace_ms=2000).drain_delay_ms == 1999


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("SF_PORT", "\u0664\u0660\u0660\u0660"),  # Arabic-Indic digits: int() takes them
        ("SF_PORT", "\uff14\uff10\uff10\uff10"),  # full-width digits
        ("SF_RPC_SHUTDOWN_GRACE_MS", "1_000_000"),
        ("SF_DRAIN_DELAY_MS", "+5"),
        ("SF_SSE_PING_MS", "-0"),
        ("SF_DRAIN_BATCH_RECORDS", "9" * 5000),
        ("SF_FILE_MODE", "0o600"),
        ("SF_FILE_MODE", "0_600"),
        ("SF_DIR_MODE", "\u0667\u0660\u0660"),
    ],
)
def test_integer_settings_take_only_ascii_digits(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    assert info.value.variable == var
    assert info.value.value == value


def test_margin_longer_than_delay_is_refused_only_with_probe_counting() -> None:
    Settings.from_env({"SF_DRAIN_MARGIN_MS": "900", "SF_DRAIN_DELAY_MS": "500"})
    with pytest.raises(ConfigError, match="SF_DRAIN_MARGIN_MS"):
        Settings.from_env(
            {"SF_DRAIN_MARGIN_MS": "900", "SF_DRAIN_DELAY_MS": "500", "SF_DRAIN_AFTER_PROBES": "1"}
        )


def test_bad_explicit_argument_names_the_argument() -> None:
    with pytest.raises(ConfigError, match="drain_delay_ms"):
        Settings(drain_delay_ms=-5)


def test_unknown_override_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="grace"):
        Settings.from_env({}, grace=5)


def test_require_state_dir_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="SF_STATE_DIR"):
        Settings.from_env({}).require_state_dir()
    assert Settings.from_env({"SF_STATE_DIR": "/s"}).require_state_dir() == Path("/s")


def test_every_field_has_an_environment_variable() -> None:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(Settings) if not f.name.startswith("_")}
    assert fields == set(ENV_VARS)
    assert all(v.startswith("SF_") for v in ENV_VARS.values())


def test_config_error_pickles() -> None:
    import pickle

    err = ConfigError("SF_X", "1", "no")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)


def test_budget_below_the_default_drain_delay_says_which_setting_to_change() -> None:
    """Issue 11: only the budget was lowered; the message names both variables, their values
    and the fix, and blames the variable that was set (not the drain delay's default)."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SF_RPC_SHUTDOWN_GRACE_MS": "1000"})
    message = str(info.value)
    assert info.value.variable == "SF_RPC_SHUTDOWN_GRACE_MS"
    assert "SF_RPC_SHUTDOWN_GRACE_MS=1000" in message
    assert "SF_DRAIN_DELAY_MS=5000" in message
    assert "raise SF_RPC_SHUTDOWN_GRACE_MS or lower SF_DRAIN_DELAY_MS" in message
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SF_RPC_SHUTDOWN_GRACE_MS": "1000", "SF_DRAIN_DELAY_MS": "2000"})
    assert info.value.variable == "SF_DRAIN_DELAY_MS"
    assert "raise SF_RPC_SHUTDOWN_GRACE_MS or lower SF_DRAIN_DELAY_MS" in str(info.value)


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0:80", "http://example.com", "example.com/x", "[::1]", "-bad.example", "a..b", ""],
)
def test_host_with_a_port_or_scheme_is_refused(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(host=host, _sources={"host": "SF_HOST"})
    assert info.value.variable == "SF_HOST"
    assert "no port" in str(info.value)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "127.0.0.1", "::", "::1", "localhost", "svc-1.ns.local"]
)
def test_ip_literals_and_host_names_are_accepted(host: str) -> None:
    assert Settings(host=host).host == host


@pytest.mark.parametrize("version", ["1.0.0+local", "2.0.0-rc.1", "1!2.0.post3", "1.2.3~beta"])
def test_pep440_and_semver_versions_are_accepted(version: str) -> None:
    assert Settings.from_env({"SF_VERSION": version}).version == version


@pytest.mark.parametrize("version", ["1.0 beta", "1.0\x00", "1.0/../x", "v" * 129])
def test_versions_with_whitespace_control_or_path_characters_are_refused(version: str) -> None:
    with pytest.raises(ConfigError, match="SF_VERSION"):
        Settings.from_env({"SF_VERSION": version})


def test_state_dir_that_is_a_file_or_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"SF_STATE_DIR.*not a directory"):
        Settings.from_env({"SF_STATE_DIR": str(a_file)}).require_state_dir()
    with pytest.raises(ConfigError, match=r"SF_STATE_DIR.*cannot create"):
        Settings.from_env({"SF_STATE_DIR": str(a_file / "below")}).require_state_dir()
    created = Settings.from_env({"SF_STATE_DIR": str(tmp_path / "new" / "state")})
    assert created.require_state_dir().is_dir()


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"SF_HEALTH_PREFIX": "/internal/sf"}, "health_prefix", "/internal/sf"),
        ({"SF_HEALTH_PREFIX": "/"}, "health_prefix", ""),
        ({}, "health_prefix", "/api"),
        ({"SF_METRICS_PATH": "/metrics"}, "metrics_path", "/metrics"),
        ({}, "metrics_path", None),
        ({"SF_METRICS_PORT": "9464"}, "metrics_port", 9464),
        ({"SF_LOG_FORMAT": "json"}, "log_format", "json"),
        ({"SF_ACCESS_LOG": "0"}, "access_log", False),
        ({"SF_ACCESS_LOG": "true"}, "access_log", True),
        ({}, "access_log", False),
    ],
)
def test_observability_settings_from_env(env: dict[str, str], field: str, expected: object) -> None:
    assert getattr(Settings.from_env(env), field) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SF_HEALTH_PREFIX": "api"}, r"invalid SF_HEALTH_PREFIX='api': a path such as /api"),
        ({"SF_METRICS_PATH": "/m/"}, r"invalid SF_METRICS_PATH='/m/': a path"),
        ({"SF_LOG_FORMAT": "xml"}, r"invalid SF_LOG_FORMAT='xml': text or json"),
        ({"SF_ACCESS_LOG": "maybe"}, r"invalid SF_ACCESS_LOG='maybe': one of 1, 0"),
        ({"SF_METRICS_PORT": "70000"}, r"invalid SF_METRICS_PORT='?70000'?"),
    ],
)
def test_bad_observability_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize("prefix", ["/..", "/.", "/api/..", "/api/.", "/../api"])
def test_health_prefix_with_dot_segments_is_refused(prefix: str) -> None:
    # Clients and proxies normalise `/../healthz` away: such a replica could never be probed.
    with pytest.raises(ConfigError, match=r"invalid SF_HEALTH_PREFIX=.*not \. or \.\."):
        Settings.from_env({"SF_HEALTH_PREFIX": prefix})
    assert Settings.from_env({"SF_HEALTH_PREFIX": "/.well-known/sf"}).health_prefix == (
        "/.well-known/sf"
    )


def test_empty_health_prefix_variable_is_the_default_and_slash_is_the_root() -> None:
    assert Settings.from_env({"SF_HEALTH_PREFIX": ""}).health_prefix == "/api"
    assert Settings.from_env({"SF_HEALTH_PREFIX": "/"}).health_prefix == ""
    assert Settings(health_prefix="").health_prefix == ""
    with pytest.raises(ConfigError, match=r"; / for the root$"):
        Settings.from_env({"SF_HEALTH_PREFIX": "api"})


@pytest.mark.parametrize(
    ("env", "path"),
    [
        ({}, "/api/healthz"),
        ({}, "/api/ready"),
        ({}, "/api/livez"),
        ({}, "/api/version"),
        ({"SF_HEALTH_PREFIX": "/"}, "/healthz"),
        ({"SF_HEALTH_PREFIX": "/internal"}, "/internal/livez"),
    ],
)
def test_metrics_path_on_a_health_path_is_refused(env: dict[str, str], path: str) -> None:
    # The metrics page in place of healthz would answer 200 while the replica drains.
    with pytest.raises(
        ConfigError, match=rf"invalid SF_METRICS_PATH='{path}': must not be a health"
    ):
        Settings.from_env({**env, "SF_METRICS_PATH": path})


def test_metrics_port_equal_to_the_app_port_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"invalid SF_METRICS_PORT=4712: must differ from the app's port \(SF_PORT=4712\)",
    ):
        Settings.from_env({"SF_METRICS_PORT": "4712", "SF_PORT": "4712"})
    with pytest.raises(ConfigError, match=r"must differ from the app's port \(port=4000\)"):
        Settings(metrics_port=4000)
    assert Settings(metrics_port=0, port=0).metrics_port == 0  # both chosen by the kernel


# -- precedence: flags > explicit arguments > SF_* environment > defaults -------------------
#: field -> (environment value, explicit argument, flag value, flag's parsed value). Every
#: field of `ENV_VARS`, each through every source (a test below checks the table is complete).
_SOURCES: dict[str, tuple[str, object, str, object]] = {
    "grace_ms": ("700000", 800_000, "15m", 900_000),
    "drain_delay_ms": ("1000", 2_000, "3s", 3_000),
    "drain_after_probes": ("1", 2, "3", 3),
    "drain_margin_ms": ("100", 200, "300ms", 300),
    "state_dir": ("/e", Path("/c"), "/f", Path("/f")),
    "version": ("1.0.0", "2.0.0", "3.0.0", "3.0.0"),
    "git_sha": ("aaa", "bbb", "ccc", "ccc"),
    "replica_id": ("env", "code", "flag", "flag"),
    "host": ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.3"),
    "port": ("4001", 4002, "4003", 4003),
    "drain_interval_ms": ("100", 150, "1s", 1_000),
    "drain_batch_records": ("10", 20, "30", 30),
    "orphan_sweep_ms": ("1000", 2_000, "3s", 3_000),
    "feedback_max_bytes": ("100", 200, "300", 300),
    "sse_max_streams": ("1", 2, "3", 3),
    "sse_ping_ms": ("1000", 2_000, "3s", 3_000),
    "sse_retry_ms": ("10", 20, "30", 30),
    "sse_retention_events": ("1", 2, "3", 3),
    "sse_retention_ms": ("2000", 3_000, "4s", 4_000),
    "sse_watch": ("poll", "inotify", "auto", "auto"),
    "file_mode": ("0640", 0o660, "0644", 0o644),
    "dir_mode": ("0750", 0o770, "0755", 0o755),
    "liveness_stall_ms": ("1000", 2_000, "1m", 60_000),
    "redis_url": ("redis://e:6379/0", "redis://c:6379/0", "redis://f:6379/0", "redis://f:6379/0"),
    "health_prefix": ("/e", "/c", "/f", "/f"),
    "metrics_path": ("/me", "/mc", "/mf", "/mf"),
    "metrics_port": ("9001", 9002, "9003", 9003),
    "log_format": ("json", "text", "json", "json"),
    "access_log": ("1", False, "1", True),
    "database_url": (
        "postgresql://e/db",
        "postgresql://c/db",
        "postgresql://f/db",
        "postgresql://f/db",
    ),
    "database_table": ("t_env", "t_code", "t_flag", "t_flag"),
}


def test_the_precedence_table_covers_every_setting() -> None:
    assert set(_SOURCES) == set(ENV_VARS)


@pytest.mark.parametrize("name", sorted(_SOURCES))
def test_each_setting_through_each_source(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """flags > explicit arguments in code > SF_* environment > defaults, for every setting,
    with or without a command line, and `sources()` says which one won (what `serve` logs)."""
    from sf_lifecycle._config import command_line

    env_raw, code, flag_raw, flag = _SOURCES[name]
    var = ENV_VARS[name]
    default = getattr(Settings(), name)
    assert name not in Settings().sources()
    env_value = getattr(Settings.from_env({var: env_raw}), name)
    assert env_value != default
    assert env_value != code
    assert code != flag
    flag_name = "--" + name.replace("_", "-")
    monkeypatch.setenv(var, env_raw)
    for cl in ({}, {"replica_id" if name != "replica_id" else "port": ("--x", "7")}):
        with command_line(cl):  # another flag in force changes nothing for this setting
            # The environment fills every field not given, `Settings(...)` included.
            assert getattr(Settings(), name) == env_value
            assert Settings().sources()[name] == var
            other = "port" if name != "port" else "replica_id"
            assert getattr(Settings(**{other: 7 if other == "port" else "x"}), name) == env_value  # type: ignore[arg-type]
            explicit = Settings(**{name: code})  # type: ignore[arg-type]
            assert getattr(explicit, name) == code
            assert explicit.sources()[name] == "code"
            assert getattr(Settings.from_env(None, **{name: code}), name) == code
            # `from_env(environ=...)` reads that mapping, exactly: not os.environ.
            assert getattr(Settings.from_env({}), name) == default
    with command_line({name: (flag_name, flag_raw)}):
        for built in (
            Settings(**{name: code}),  # type: ignore[arg-type]
            Settings(),
            Settings.from_env({var: env_raw}),
            Settings.from_env({}, **{name: code}),
        ):
            assert getattr(built, name) == flag
            assert built.sources()[name] == flag_name
    # The command line is in force only inside: after it, the environment again.
    assert getattr(Settings(), name) == env_value


def test_settings_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Settings(700_000, grace_ms=20_000)  # type: ignore[misc]
    with pytest.raises(TypeError):
        Settings(700_000)  # type: ignore[call-arg]


def test_replace_keeps_the_source_of_every_field_it_does_not_change() -> None:
    import dataclasses

    base = Settings.from_env({"SF_DRAIN_DELAY_MS": "1500"}, port=4712)
    s = dataclasses.replace(base, replica_id="x")
    assert s.sources() == {
        "drain_delay_ms": "SF_DRAIN_DELAY_MS",
        "port": "code",
        "replica_id": "code",
    }
    assert s.describe_sources() == (
        "drain_delay_ms=1500 (SF_DRAIN_DELAY_MS), replica_id='x' (code), port=4712 (code)"
    )
    assert dataclasses.replace(s, drain_delay_ms=2000).sources()["drain_delay_ms"] == "code"


def test_settings_replace_labels_exactly_the_changed_fields_as_code() -> None:
    """A value pinned in code that equals the environment's is still the code's (issue 14)."""
    base = Settings.from_env({"SF_DRAIN_AFTER_PROBES": "2", "SF_DRAIN_DELAY_MS": "1500"})
    s = base.replace(drain_after_probes=2, port=4712)
    assert s.sources() == {
        "drain_after_probes": "code",
        "drain_delay_ms": "SF_DRAIN_DELAY_MS",
        "port": "code",
    }
    assert (s.drain_after_probes, s.drain_delay_ms, s.port) == (2, 1500, 4712)
    assert s.__replace__(replica_id="a").sources()["drain_after_probes"] == "code"  # copy.replace
    with pytest.raises(TypeError, match="nosuch"):
        base.replace(nosuch=1)
    with pytest.raises(ConfigError):
        base.replace(grace_ms=1000)  # the rules hold: delay 1500 > grace


def test_pickled_settings_keep_their_sources() -> None:
    """multiprocessing pickles settings: the copy keeps every source, and deriving from it
    (`replace`, `dataclasses.replace`) labels only the changed field as code."""
    import dataclasses
    import pickle

    base = Settings.from_env({"SF_DRAIN_DELAY_MS": "1500", "SF_PORT": "5001"}, replica_id="a")
    copy = pickle.loads(pickle.dumps(base))
    assert copy == base
    assert (
        copy.sources()
        == base.sources()
        == {
            "drain_delay_ms": "SF_DRAIN_DELAY_MS",
            "port": "SF_PORT",
            "replica_id": "code",
        }
    )
    expected = {**base.sources(), "grace_ms": "code"}
    assert dataclasses.replace(copy, grace_ms=700_000).sources() == expected
    assert copy.replace(grace_ms=700_000).sources() == expected
    assert copy.describe_sources() == base.describe_sources()


def test_durations_in_code_take_a_unit_as_everywhere() -> None:
    assert Settings(grace_ms="30s", drain_delay_ms="1500ms").grace_ms == 30_000  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        Settings(grace_ms="5 s")  # type: ignore[arg-type]
    assert info.value.variable == "grace_ms"
    assert "500ms, 5s, 2m" in str(info.value)


def test_the_budget_error_under_the_command_line_names_the_flag() -> None:
    from sf_lifecycle._cli import _SERVE_FLAGS
    from sf_lifecycle._config import command_line

    with (
        command_line({"drain_delay_ms": ("--drain-delay-ms", "20m")}, _SERVE_FLAGS),
        pytest.raises(ConfigError) as info,
    ):
        Settings.from_env({})
    assert info.value.variable == "--drain-delay-ms"
    assert "raise --grace-ms or lower --drain-delay-ms" in str(info.value)


def test_an_invalid_value_names_the_flag_or_the_variable_it_came_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sf_lifecycle._config import command_line

    with pytest.raises(ConfigError) as info, command_line({"port": ("--port", "eighty")}):
        pass
    assert info.value.variable == "--port"
    monkeypatch.setenv("SF_PORT", "eighty")
    with pytest.raises(ConfigError) as info:
        Settings(replica_id="a")
    assert info.value.variable == "SF_PORT"
    monkeypatch.delenv("SF_PORT")
    with (
        command_line({"drain_delay_ms": ("--drain-delay-ms", "2s")}),
        pytest.raises(ConfigError) as info,
    ):
        Settings(grace_ms=1000)
    assert info.value.variable == "--drain-delay-ms"
    assert "grace_ms=1000" in str(info.value)


def test_describe_sources_lists_each_non_default_setting_and_its_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sf_lifecycle._config import command_line

    monkeypatch.setenv("SF_DRAIN_DELAY_MS", "1500")
    with command_line({"port": ("--port", "4712")}):
        s = Settings(replica_id="a")
    assert s.describe_sources() == (
        "drain_delay_ms=1500 (SF_DRAIN_DELAY_MS), replica_id='a' (code), port=4712 (--port)"
    )
    assert Settings.from_env({}).describe_sources() == "all defaults"


@pytest.mark.parametrize(
    ("raw", "ms"),
    [("1500", 1500), ("1500ms", 1500), ("5s", 5000), ("2m", 120_000), (" 7s ", 7000)],
)
def test_durations_take_milliseconds_or_a_unit(raw: str, ms: int) -> None:
    from sf_lifecycle._config import parse_ms

    assert parse_ms(raw) == ms
    assert Settings.from_env({"SF_SSE_PING_MS": raw}).sse_ping_ms == ms


@pytest.mark.parametrize("raw", ["1.5s", "5 s", "5h", "-5s", "s", "5sec", "1_000ms", "\u0665s"])
def test_durations_refuse_anything_else(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SF_SSE_PING_MS": raw})
    assert info.value.variable == "SF_SSE_PING_MS"
    assert "500ms, 5s, 2m" in str(info.value)


def test_mistyped_variables_are_found_with_the_closest_setting() -> None:
    from sf_lifecycle._config import unknown_variables

    env = {
        "SF_DRAIN_DELAY": "1",
        "SF_PORTS": "1",
        "SF_DRAIN_DELAY_MS": "1",  # valid
        "SF_CRASH_AT": "x",  # the project's own
        "SF_MY_APP_TOKEN": "x",  # an application's own, close to nothing
        "DRAIN_DELAY_MS": "1",  # not SF_
    }
    assert unknown_variables(env) == [
        ("SF_DRAIN_DELAY", "SF_DRAIN_DELAY_MS"),
        ("SF_PORTS", "SF_PORT"),
    ]


def test_variables_named_after_a_field_or_flag_are_found() -> None:
    """`SF_GRACE_MS` (the field is `grace_ms`, the flag `--grace-ms`) and `SF_HOST_NAME` are
    the mistakes operators make; each is warned about with the variable meant."""
    from sf_lifecycle._cli import _SERVE_FLAGS
    from sf_lifecycle._config import unknown_variables

    env = {"SF_GRACE_MS": "30000", "SF_HOST_NAME": "0.0.0.0", "SF_HOSTNAME": "pod-1"}
    assert unknown_variables(env, _SERVE_FLAGS) == [
        ("SF_GRACE_MS", "SF_RPC_SHUTDOWN_GRACE_MS"),
        ("SF_HOST_NAME", "SF_HOST"),
    ]


def test_the_start_up_log_never_shows_a_password() -> None:
    line = Settings.from_env({"SF_REDIS_URL": "redis://:hunter2@cache:6379/0"}).describe_sources()
    assert "hunter2" not in line
    assert "redis_url='redis://<redacted>@cache:6379/0' (SF_REDIS_URL)" in line
    env = {"SF_DATABASE_URL": "postgresql://app:hunter2@db:5432/sf"}
    line = Settings.from_env(env).describe_sources()
    assert "hunter2" not in line
    assert "database_url='postgresql://<redacted>@db:5432/sf' (SF_DATABASE_URL)" in line


def test_the_sink_table_is_a_setting_checked_as_an_identifier() -> None:
    assert Settings.from_env({}).database_table == "sf_feedback"
    assert Settings.from_env({"SF_DATABASE_TABLE": "feedback_v2"}).database_table == ("feedback_v2")
    with pytest.raises(ConfigError, match="SF_DATABASE_TABLE"):
        Settings.from_env({"SF_DATABASE_TABLE": 'x"; DROP TABLE sf_feedback; --'})


def test_check_infra_defaults_ignore_a_command_line_in_force() -> None:
    """`check-infra`'s built-in defaults, loaded while `serve` holds its flags, are the
    library's defaults, not the flags (nor the environment)."""
    import importlib

    import sf_lifecycle._infra_common as common
    from sf_lifecycle._config import command_line

    try:
        with command_line({"drain_delay_ms": ("--drain-delay-ms", "1234")}):
            importlib.reload(common)
            assert common.DEFAULTS.drain_delay_ms == 5_000
            assert common.DEFAULTS.sources() == {}
    finally:
        importlib.reload(common)
