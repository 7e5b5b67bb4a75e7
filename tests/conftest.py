"""Suite-wide rules and fixtures: a skipped test counts as a failure (a skip proves nothing)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sf_lifecycle._config import ENV_VARS
from sf_lifecycle.testing import ServerProcess


@pytest.fixture(autouse=True)
def _no_settings_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Settings(...)` reads `SF_*` from os.environ: a variable in the shell that runs the
    suite must not change what a test builds."""
    for var in ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Servers a test starts (append each one): every one is closed, by PID, whatever happens."""
    started: list[ServerProcess] = []
    try:
        yield started
    finally:
        for s in started:
            s.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} test(s) skipped: a skip counts as a failure in this suite", red=True
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.stats.get("skipped") and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
