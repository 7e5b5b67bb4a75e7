"""The README's configuration table must not drift from `Settings`, nor its logger table from
the loggers the library logs under."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from sf_lifecycle import Settings
from sf_lifecycle._config import ENV_VARS

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


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
        if isinstance(value, bool):  # as the variable takes it
            assert documented == str(int(value)), f.name
        elif isinstance(value, int):
            assert documented == str(value), f.name
        elif value is None:
            assert documented in {"unset", "package version"}, f.name


def test_readme_first_screen_gives_the_two_commands() -> None:
    head = "\n".join(README.read_text().splitlines()[:12])
    assert "make demo" in head
    assert "make test" in head


def test_the_readme_lists_every_logger_the_library_logs_under() -> None:
    """A renamed logger breaks a user's logging configuration silently: the README's table
    is the list of names, so it must be exactly the loggers the modules log through."""
    src = README.parent / "src" / "sf_lifecycle"
    used = set()
    for path in src.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        m = re.search(r'^logger = logging\.getLogger\("([\w.]+)"\)', text, re.M)
        if m and re.search(r"\blogger\.(debug|info|warning|error|exception|log)\(", text):
            used.add(m.group(1))
    documented = set(re.findall(r"^\| `(sf_lifecycle(?:\.[\w]+)+)` \|", README.read_text(), re.M))
    assert documented == used


#: Formulations of the grace-budget rule that are not the rule (the budget counts from the
#: signal and contains the drain delay; the kill timeout is at least the budget plus 10 s).
_OTHER_BUDGET_RULES = re.compile(
    r"<=\s*605|\b605\s*s\b|grace\s*\+\s*(the\s+)?(drain|delay)|budget plus a second"
    r"|by a second|a second more|\+\s*drain delay|grace budget \+ drain"
    r"|GRACE_MS\s*(\([^)]*\))?\s*\+\s*(SF_)?DRAIN|budget\)?\s*\+\s*(a\s+)?margin"
    r"|GRACE_MS\s*(\([^)]*\))?\s*\+\s*a\s+margin",
    re.IGNORECASE,
)


def _documents() -> list[Path]:
    out = [ROOT / n for n in ("README.md", "ARCHITECTURE.md", "RELIABILITY.md")]
    for folder, pattern in (("infra", "*"), ("docs", "*"), ("src", "*.py"), ("examples", "*.py")):
        out += [p for p in (ROOT / folder).rglob(pattern) if p.is_file()]
    return out


def test_the_grace_budget_rule_has_one_formulation_everywhere() -> None:
    """The one rule, and no other: docs, infra comments and code state the same thing."""
    from sf_lifecycle._infra_common import KILL_MARGIN_MS

    found = [
        f"{p.relative_to(ROOT)}: {m.group(0)!r}"
        for p in _documents()
        for m in _OTHER_BUDGET_RULES.finditer(p.read_text(errors="replace"))
    ]
    assert found == []
    assert KILL_MARGIN_MS == 10_000
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "must be at least the budget plus 10 s, plus any preStop sleep: 610 s" in readme
    compose = yaml.safe_load((ROOT / "infra" / "docker-compose.yaml").read_text())
    grace_s = Settings().grace_ms // 1000
    assert compose["services"]["sf"]["stop_grace_period"] == f"{grace_s + 10}s"
    pods = [
        d["spec"]["template"]["spec"]
        for p in (ROOT / "infra" / "k8s").glob("*.yaml")
        for d in yaml.safe_load_all(p.read_text())
        if d and d.get("kind") == "Deployment"
    ]
    assert pods
    assert {p["terminationGracePeriodSeconds"] for p in pods} == {grace_s + 10}


def test_the_readme_asgi_testing_snippet_runs_as_written(tmp_path: Path) -> None:
    """The snippet under "Testing an app in process", verbatim, in a pytest of its own with no
    configuration (pytest-asyncio in its default strict mode, as a user's project has it), its
    test run twice: the fixture builds an app per test."""
    text = README.read_text()
    start = text.index("Testing an app in process")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block is not None
    snippet = block.group(1)
    assert "async with started(app)" in snippet
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_snippet.py").write_text(
        snippet + "\n\ntest_hello_again = test_hello\n", encoding="utf-8"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SF_")}
    env["PYTHONPATH"] = str(ROOT)
    # Importing the example builds its module-level app, which needs a state directory.
    env["SF_STATE_DIR"] = str(tmp_path / "module-state")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_snippet.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 passed" in run.stdout
