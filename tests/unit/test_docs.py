"""The README's configuration table must not drift from `Settings`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from sf_lifecycle import Settings
from sf_lifecycle.config import ENV_VARS

README = Path(__file__).resolve().parents[2] / "README.md"


def config_rows() -> dict[str, tuple[str, str]]:
    rows: dict[str, tuple[str, str]] = {}
    for line in README.read_text().splitlines():
        m = re.match(r"\| `(\w+)` \| `(SF_\w+)` \| ([^|]+) \|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3).strip())
    return rows


def test_every_setting_is_in_the_readme_table_with_its_variable() -> None:
    rows = config_rows()
    assert set(rows) == set(ENV_VARS)
    for name, (var, _) in rows.items():
        assert ENV_VARS[name] == var


def test_numeric_defaults_in_the_readme_match_the_code() -> None:
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        if f.name.startswith("_"):
            continue
        value = getattr(defaults, f.name)
        documented = config_rows()[f.name][1]
        if isinstance(value, int):
            assert documented == str(value), f.name
        elif value is None:
            assert documented in {"unset", "package version"}, f.name


def test_readme_first_screen_gives_the_two_commands() -> None:
    head = "\n".join(README.read_text().splitlines()[:12])
    assert "make demo" in head
    assert "make test" in head
