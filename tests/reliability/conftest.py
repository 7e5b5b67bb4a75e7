"""Rounds: `make reliability` runs the timing-dependent class tests many times over.

Each of these tests drives real processes through a race (a signal against a hook, a sink
failing at a random moment of a drain, a folder swapped while requests arrive), so one pass is
one sample. `make test` runs one round; `SF_RELIABILITY_ROUNDS=N` (set by `python -m
tests.reliability --rounds N`) runs each N times, as separate test ids.
"""

from __future__ import annotations

import os

import pytest

ROUNDS = int(os.environ.get("SF_RELIABILITY_ROUNDS", "1"))
#: Modules whose tests are repeated (the in-process, deterministic ones gain nothing from it).
REPEATED = {
    "test_age_queue",
    "test_background_tasks",
    "test_budget",
    "test_crash_points",
    "test_hooks",
    "test_paths",
}


@pytest.fixture
def sf_round(request: pytest.FixtureRequest) -> int:
    round_: int = request.param
    return round_


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if ROUNDS > 1 and metafunc.module.__name__.rpartition(".")[2] in REPEATED:
        metafunc.fixturenames.append("sf_round")
        metafunc.parametrize("sf_round", range(1, ROUNDS + 1), indirect=True, ids="round{}".format)
