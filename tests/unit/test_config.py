from __future__ import annotations

from pathlib import Path

import pytest

from sf_lifecycle import ConfigError, Settings
from sf_lifecycle.config import ENV_VARS


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
