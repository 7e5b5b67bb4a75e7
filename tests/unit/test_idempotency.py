"""The idempotency index's claim / settle / release API, and its wiring beside a queue."""

from __future__ import annotations

from pathlib import Path

import pytest

from sf_lifecycle import FeedbackQueue, Lifecycle, Settings
from sf_lifecycle.idempotency import IdempotencyIndex, KnownKey

RID = "a" * 32


async def test_claim_settle_release(tmp_path: Path) -> None:
    """Steps: claim a key (free: None); claim it again (in flight: id None, same hash);
    settle it (a retry sees the id); release a second claimed key (free again); a release
    after settle changes nothing."""
    index = IdempotencyIndex(tmp_path / "i.sqlite3")
    try:
        assert await index.claim("k1", "sha1") is None
        assert await index.claim("k1", "sha1") == KnownKey("sha1", None)
        assert await index.claim("k1", "other") == KnownKey("sha1", None)
        index.settle("k1", RID)
        assert await index.claim("k1", "sha1") == KnownKey("sha1", RID)
        index.release("k1")  # settled: a late release must not forget the id
        assert await index.claim("k1", "sha1") == KnownKey("sha1", RID)

        assert await index.claim("k2", "sha2") is None
        index.release("k2")
        assert await index.claim("k2", "sha2") is None  # claimable again
    finally:
        index.close()


async def test_held_keys_are_asked_only_for_keys_not_held_here(tmp_path: Path) -> None:
    index = IdempotencyIndex(tmp_path / "i.sqlite3")
    asked: list[str] = []

    def held(key: str) -> tuple[str, str] | None:
        asked.append(key)
        return ("sha-peer", RID) if key == "peer" else None

    class Refused(Exception):
        pass

    def refuse(key: str) -> tuple[str, str] | None:
        raise Refused

    try:
        assert await index.claim("peer", "sha-peer", held=held) == KnownKey("sha-peer", RID)
        assert await index.claim("mine", "s", held=held) is None
        assert await index.claim("mine", "s", held=held) == KnownKey("s", None)
        assert asked == ["peer", "mine"]  # not asked again for a key this process holds
        with pytest.raises(Refused):
            await index.claim("new", "s", held=refuse)
        assert await index.claim("new", "s") is None  # the refused call claimed nothing
    finally:
        index.close()


async def test_the_queue_wiring_makes_the_index_and_records_delivered_keys(
    tmp_path: Path,
) -> None:
    """`install` creates the index beside the queue; a delivered keyed record is found in the
    file after the drain (by a fresh index: not from memory)."""
    settings = Settings(state_dir=tmp_path)
    lifecycle = Lifecycle(settings)
    queue = FeedbackQueue(tmp_path, settings=settings)
    assert queue.idempotency is None
    queue.install(lifecycle)
    index = queue.idempotency
    assert index is not None
    assert index.path == tmp_path / "feedback" / "idempotency.sqlite3"
    assert await index.claim("k", "sha") is None
    rid = await queue.append({"x": 1}, meta={"key": "k", "sha": "sha"})
    index.settle("k", rid)
    assert queue.sink is not None
    await queue.drain(queue.sink)
    await queue.close()
    fresh = IdempotencyIndex(tmp_path / "feedback" / "idempotency.sqlite3")
    try:
        assert await fresh.lookup("k") == KnownKey("sha", rid)
    finally:
        fresh.close()


async def test_install_reports_the_index_in_readiness(tmp_path: Path) -> None:
    """The queue's wiring, not the routes, puts `idempotency-index` in `/api/ready`: keyed
    writes depend on the index whoever builds the routes."""
    settings = Settings(state_dir=tmp_path)
    lifecycle = Lifecycle(settings)
    queue = FeedbackQueue(tmp_path, settings=settings)
    queue.install(lifecycle)
    await lifecycle.startup()
    try:
        _, body = await lifecycle.readiness()
        assert body["checks"]["idempotency-index"] == {"ok": True}, body
    finally:
        await lifecycle.shutdown()


async def test_feedback_routes_only_builds_routes(tmp_path: Path) -> None:
    """No side effects: given a lifecycle and an index, `feedback_routes` registers nothing on
    the lifecycle; with neither an index nor an installed queue it refuses, saying what to do."""
    from sf_lifecycle import feedback_routes

    settings = Settings(state_dir=tmp_path)
    lifecycle = Lifecycle(settings)
    queue = FeedbackQueue(tmp_path, settings=settings)
    index = IdempotencyIndex(queue.dir / "idempotency.sqlite3")
    try:
        with pytest.raises(ValueError, match="no idempotency index") as info:
            feedback_routes(queue, lifecycle)
        assert "call queue.install(lifecycle) before feedback_routes" in str(info.value)
        assert "or pass index=IdempotencyIndex.for_queue(queue)" in str(info.value)
        assert len(feedback_routes(queue, lifecycle, index=index)) == 1
        await lifecycle.startup()
        ok, body = await lifecycle.readiness()
        assert (ok, "checks" in body) == (True, False), body
    finally:
        await lifecycle.shutdown()
        await queue.close()
        index.close()
