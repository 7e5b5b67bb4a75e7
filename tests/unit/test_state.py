from __future__ import annotations

import asyncio
import threading

from sf_lifecycle import Phase
from sf_lifecycle._state import ShutdownState


def test_starts_in_starting_with_timestamp() -> None:
    st = ShutdownState()
    assert st.phase is Phase.STARTING
    change = st.since(Phase.STARTING)
    assert change is not None
    assert change.wall > 0
    assert st.since(Phase.READY) is None
    assert not st.serving


def test_every_forward_transition_records_its_time() -> None:
    st = ShutdownState()
    assert st.mark_ready()
    assert st.serving
    assert st.begin_draining()
    assert not st.serving
    assert st.mark_stopped()
    stamps = [st.since(p) for p in Phase]
    assert all(s is not None for s in stamps)
    monos = [s.monotonic for s in stamps if s is not None]
    assert monos == sorted(monos)
    assert str(st.phase) == "stopped"


def test_phases_never_move_backwards() -> None:
    st = ShutdownState()
    st.begin_draining()
    assert st.mark_ready() is False
    assert st.phase is Phase.DRAINING
    assert st.since(Phase.READY) is None  # skipped, never entered
    assert st.begin_draining() is False


async def test_wait_for_returns_when_phase_reached() -> None:
    st = ShutdownState()
    waiter = asyncio.create_task(st.wait_for(Phase.DRAINING))
    await asyncio.sleep(0)
    st.mark_ready()
    await asyncio.sleep(0.01)
    assert not waiter.done()
    st.begin_draining()
    change = await asyncio.wait_for(waiter, 1)
    assert change.phase is Phase.DRAINING


async def test_wait_for_past_phase_returns_at_once_and_reports_skips() -> None:
    st = ShutdownState()
    st.mark_stopped()
    change = await asyncio.wait_for(st.wait_for(Phase.READY), 1)
    assert change.phase is Phase.STOPPED


async def test_transition_from_another_thread_wakes_the_loop() -> None:
    st = ShutdownState()
    waiter = asyncio.create_task(st.wait_for(Phase.READY))
    await asyncio.sleep(0)
    t = threading.Thread(target=st.mark_ready)
    t.start()
    t.join()
    assert (await asyncio.wait_for(waiter, 1)).phase is Phase.READY


async def test_closing_event_wakes_waiters_once() -> None:
    st = ShutdownState()
    waiter = asyncio.create_task(st.wait_closing())
    await asyncio.sleep(0)
    assert not waiter.done()
    assert st.begin_closing() is True
    await asyncio.wait_for(waiter, 1)
    assert st.begin_closing() is False
    await asyncio.wait_for(st.wait_closing(), 1)  # already closing: returns at once


def test_probe_counter_records_times_in_order() -> None:
    st = ShutdownState()
    assert st.note_probe_503() == 1
    assert st.note_probe_503() == 2
    assert st.probes_503 == 2
    assert st.probe_503_times == sorted(st.probe_503_times)
