from sf_lifecycle.testing import ServiceFactory, assert_delivered_once


def test_no_write_is_lost_when_killed_mid_drain(sf_service: ServiceFactory) -> None:
    # Keep writes queued until shutdown, so the final drain has work to be killed in.
    svc = sf_service("myapp:app", env={"SF_DRAIN_INTERVAL_MS": "60000"})
    acked = [svc.post_json("/api/feedback", {"n": i})["id"] for i in range(20)]

    # SIGTERM; the server SIGKILLs itself right after the drain renamed the queue file.
    svc.kill_during_drain()

    # The next container: same state dir, ready once recovery delivered the dead one's queue.
    nxt = svc.restart()
    acked += [nxt.post_json("/api/feedback", {"n": i})["id"] for i in range(20, 25)]
    shutdown = nxt.terminate_and_wait()
    assert shutdown.exit_code == 0
    assert shutdown.timeline.names[:3] == ["signal", "first_503", "listeners_closed"]

    # Each acknowledged id in the sink exactly once; nothing left in .draining.
    assert_delivered_once(acked, state_dir=svc.state_dir)
