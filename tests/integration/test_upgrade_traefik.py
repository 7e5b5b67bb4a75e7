"""The runbook's gated blue/green upgrade through real Traefik, under mixed load (the demo's
flow, smaller): candidate verified, `sf-lifecycle rollout` 10 -> 50 -> 100, old drained."""

from __future__ import annotations

import os

import pytest

from examples.demo import Options, Summary, run

pytestmark = pytest.mark.integration

DRAIN_DELAY_S = 5.0


@pytest.fixture(scope="module")
def upgrade() -> Summary:
    return run(
        Options(
            # Two of the four workers are cookie-less: at 10 % the candidate gets ~3 req/s.
            rate=60,
            workers=4,
            sse_clients=2,
            warmup_s=2.0,
            cooldown_s=2.0,
            quiet=True,
            hold="2s",
            min_requests=3,
        )
    )


def test_candidate_verified_then_promoted_step_by_step(upgrade: Summary) -> None:
    """Steps: Traefik -> sf-v1 (weights sf 100); load; sf-v2 in the candidate pool, verified
    through its router; rollout 10 -> 50 -> 100, each step passed on Traefik's metrics."""
    assert upgrade.verified["/api/ready"].startswith("200 ")
    assert upgrade.verified["/api/version"].startswith("200 ")
    assert '"replica":"sf-v2"' in upgrade.verified["/api/version"]
    assert upgrade.rollout_exit == 0, upgrade.rollout_report
    report = upgrade.rollout_report
    assert report["result"] == "promoted"
    assert [(s["weight"], s["verdict"]) for s in report["steps"]] == [
        (10, "ok"),
        (50, "ok"),
        (100, "ok"),
    ]
    assert report["weights_after"] == {"sf": 0, "sf-candidate": 100}


def test_no_request_failed(upgrade: Summary) -> None:
    """Every request sent during the whole upgrade got a 2xx."""
    assert upgrade.sent > 100
    assert upgrade.failed_total == 0, upgrade.failed


def test_every_acknowledged_write_delivered_exactly_once(upgrade: Summary) -> None:
    assert len(upgrade.feedback_acked) > 10
    assert upgrade.feedback_lost() == set()
    assert upgrade.feedback_duplicated() == 0
    assert set(upgrade.feedback_delivered) == upgrade.feedback_acked


def test_every_sse_client_received_every_event_once(upgrade: Summary) -> None:
    published = sum(len(v) for v in upgrade.events_published.values())
    assert published > 10
    assert upgrade.events_received
    assert upgrade.sse_gaps_and_duplicates() == (0, 0)
    for client, received in upgrade.events_received.items():
        session = client.split("#", 1)[0]
        assert received == upgrade.events_published[session], client


def test_sticky_clients_were_repinned_to_live_replicas(upgrade: Summary) -> None:
    # Pinned to sf-v1 until its weight went to 0, then re-pinned to sf-v2 at once.
    assert upgrade.sticky_repinned >= 1
    assert set(upgrade.replicas_seen) == {"sf-v1", "sf-v2"}


def test_old_replicas_left_the_pool_and_exited_in_time(upgrade: Summary) -> None:
    assert [s.replica for s in upgrade.stops] == ["sf-v1", "sf-v2"]
    for stop in upgrade.stops:
        assert stop.exit_code == 0, stop
        assert stop.to_pool_exit_s is not None, f"{stop.replica} never left Traefik's pool"
        assert stop.to_exit_s is not None
        assert stop.to_pool_exit_s < stop.to_exit_s
        assert stop.to_exit_s < DRAIN_DELAY_S + 1.0, stop


def test_no_process_left_behind(upgrade: Summary) -> None:
    assert upgrade.leftover_pids == []
    assert len(upgrade.pids) == 4  # sf-v1, Traefik, sf-v2, the rollout command
    for pid in upgrade.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
