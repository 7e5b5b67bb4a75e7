"""The plugin's own tests drive inner pytest sessions with `pytester`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The inner sessions' configuration: warnings are errors there too.
INNER_INI = """
[pytest]
addopts = -p no:cacheprovider --strict-markers
filterwarnings = error
asyncio_default_fixture_loop_scope = function
"""

RunInner = Callable[..., pytest.RunResult]


@pytest.fixture
def run_inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> RunInner:
    """Run pytest in a subprocess in `pytester.path`, the plugin loaded by its entry point.

    The examples and the test apps import from the repository root (PYTHONPATH), as a user's
    app imports from their project.
    """
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeini(INNER_INI)

    def run(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess("-v", *args, timeout=90)

    return run
