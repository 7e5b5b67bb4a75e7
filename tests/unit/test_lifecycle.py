from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from starlette.applications import Starlette

from sf_lifecycle import BudgetExceeded, Lifecycle, Phase, Settings


async def test_hooks_run_in_order_with_the_deadline_then_stopped() -> None:
    lc = Lifecycle(Settings(grace_ms=5_000, drain_delay_ms=0))
    calls: list[tuple[str, float]] = []

    async def first(deadline: float) -> None:
        calls.append(("first", deadline))

    async def second(deadline: float) -> None:
        assert lc.state.phase is Phase.DRAINING  # not stopped until every hook ran
        calls.append(("second", deadline))

    lc.on_shutdown("first", first)
    lc.on_shutdown("second", second)
    await lc.startup()
    before = time.monotonic()
    await lc.shutdown()
    assert [c[0] for c in calls] == ["first", "second"]
    # a hook followed by others gets half of what is left; the last one the rest
    assert before + 2.4 < calls[0][1] <= time.monotonic() + 2.5
    assert before + 4.9 < calls[1][1] <= time.monotonic() + 5.0
    assert lc.state.phase is Phase.STOPPED
    assert lc.unfinished == []
    assert lc.failed == []


async def test_hook_past_the_deadline_is_cancelled_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hook still running at its share of the budget is cancelled and reported; the hook
    after it still gets the other half (one stuck hook cannot starve the final drain)."""
    lc = Lifecycle(Settings(grace_ms=400, drain_delay_ms=0))
    cancelled = asyncio.Event()
    ran_after: list[str] = []

    async def slow(deadline: float) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def later(deadline: float) -> None:
        ran_after.append("later")

    lc.on_shutdown("slow-drain", slow)
    lc.on_shutdown("later", later)
    began = time.monotonic()
    await lc.shutdown()
    assert time.monotonic() - began < 2
    assert cancelled.is_set()
    assert lc.unfinished == ["slow-drain"]
    assert ran_after == ["later"]
    assert "grace budget exceeded: shutdown hook slow-drain" in caplog.text
    assert lc.state.phase is Phase.STOPPED


@pytest.mark.parametrize("last", [True, False])
async def test_a_hook_giving_up_at_its_deadline_is_logged_as_budget_exceeded(
    caplog: pytest.LogCaptureFixture, last: bool
) -> None:
    """Steps: a hook that stops at its deadline, as the queue's final drain does (abandons
    the sink call, then puts its files back, in a thread), and raises `BudgetExceeded`; as
    the last hook (its share ends at the deadline) and before another; shutdown. It is
    reported unfinished and logged as what it is, the work it left, not as a hook that was
    cancelled (it was not: it gave up by itself)."""
    lc = Lifecycle(Settings(grace_ms=300, drain_delay_ms=0))

    async def drain(deadline: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await asyncio.sleep(10)  # the sink call, abandoned at the deadline
        await asyncio.to_thread(time.sleep, 0.005)  # bookkeeping on disk
        raise BudgetExceeded("2 file(s) not delivered before the deadline")

    async def after(deadline: float) -> None:
        pass

    lc.on_shutdown("final-drain", drain)
    if not last:
        lc.on_shutdown("after", after)
    with caplog.at_level(logging.ERROR, logger="sf_lifecycle.lifecycle"):
        await lc.shutdown()
    assert lc.unfinished == ["final-drain"]
    assert lc.failed == []
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1, lines
    assert "shutdown hook final-drain gave up after" in lines[0], lines
    assert "2 file(s) not delivered before the deadline" in lines[0], lines
    assert "cancel" not in lines[0], lines


async def test_a_last_hook_that_never_finishes_ends_the_shutdown_at_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Steps: grace 200 ms, one hook that never finishes; shutdown. The budget is a ceiling:
    the hook's deadline (with its time to give up) lies inside the budget, the shutdown
    returns at the deadline, not after it, and the hook is reported unfinished with an error
    line."""
    lc = Lifecycle(Settings(grace_ms=200, drain_delay_ms=0))
    given: list[float] = []

    async def stuck(deadline: float) -> None:
        given.append(deadline)
        await asyncio.sleep(60)

    lc.on_shutdown("stuck", stuck)
    with caplog.at_level(logging.ERROR, logger="sf_lifecycle.lifecycle"):
        await lc.shutdown()
    ended = time.monotonic()
    assert lc.deadline is not None
    assert ended - lc.deadline < 0.025, f"{(ended - lc.deadline) * 1000:.0f} ms past the deadline"
    assert given[0] < lc.deadline  # its time to give up comes out of the budget
    assert lc.unfinished == ["stuck"]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1, lines
    assert "grace budget exceeded: shutdown hook stuck cancelled after" in lines[0], lines


@pytest.mark.parametrize("last", [True, False])
async def test_a_hook_that_finishes_after_its_deadline_is_reported_unfinished(
    caplog: pytest.LogCaptureFixture, last: bool
) -> None:
    """Steps: a hook that ignores its deadline and finishes 20 ms after it (inside its share);
    shutdown. It overran the budget it was given: reported in `unfinished` (not `failed`) with
    an error line saying by how much, and the hook after it still runs."""
    lc = Lifecycle(Settings(grace_ms=400, drain_delay_ms=0))
    ran: list[str] = []

    async def late(deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()) + 0.02)
        ran.append("late")

    async def after(deadline: float) -> None:
        ran.append("after")

    lc.on_shutdown("late", late)
    if not last:
        lc.on_shutdown("after", after)
    with caplog.at_level(logging.ERROR, logger="sf_lifecycle.lifecycle"):
        await lc.shutdown()
    assert ran == (["late"] if last else ["late", "after"])
    assert lc.unfinished == ["late"]
    assert lc.failed == []
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1, lines
    assert "grace budget exceeded: shutdown hook late finished after" in lines[0], lines
    assert "past its deadline" in lines[0], lines


async def test_failing_hook_is_reported_and_the_next_still_runs() -> None:
    lc = Lifecycle(Settings())
    ran: list[str] = []

    async def broken(deadline: float) -> None:
        raise OSError("disk gone")

    async def fine(deadline: float) -> None:
        ran.append("fine")

    lc.on_shutdown("broken", broken)
    lc.on_shutdown("fine", fine)
    await lc.shutdown()
    assert lc.failed == ["broken"]
    assert lc.unfinished == []
    assert ran == ["fine"]


async def test_shutdown_and_startup_run_once() -> None:
    lc = Lifecycle(Settings())
    runs: list[str] = []

    async def hook(deadline: float) -> None:
        runs.append("hook")

    async def task() -> None:
        runs.append("task")

    lc.on_shutdown("h", hook)
    lc.on_startup("t", task)
    await lc.startup()
    await lc.startup()
    await asyncio.sleep(0.01)
    await lc.shutdown()
    await lc.shutdown()
    assert runs == ["task", "hook"]


async def test_startup_tasks_still_running_at_shutdown_are_cancelled() -> None:
    lc = Lifecycle(Settings())
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    lc.on_startup("forever", forever)
    await lc.startup()
    await asyncio.sleep(0)
    await lc.shutdown()
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_install_runs_app_lifespan_outside_the_hooks() -> None:
    order: list[str] = []

    @contextlib.asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        order.append("app-open")
        yield
        order.append("app-close")

    lc = Lifecycle(Settings())

    async def drain(deadline: float) -> None:
        order.append("hook")

    lc.on_shutdown("drain", drain)
    app = lc.install(Starlette(lifespan=app_lifespan))
    async with app.router.lifespan_context(app):
        order.append(f"serving:{lc.state.phase}")
    assert order == ["app-open", "serving:ready", "hook", "app-close"]
    assert lc.state.phase is Phase.STOPPED


async def test_failing_startup_task_is_retried_and_ready_names_attempts() -> None:
    """A start-up task that fails twice is run again with backoff; `/api/ready` stays not
    ready meanwhile, naming the task, the attempt count and the last error without a path;
    then the third attempt succeeds and the replica is ready."""
    lc = Lifecycle(Settings())
    attempts: list[float] = []
    release = asyncio.Event()

    async def flaky() -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= 2:
            raise OSError(5, "Input/output error", "/var/lib/secret/feedback.sqlite3")
        await release.wait()

    lc.on_startup("feedback-recovery", flaky)
    await lc.startup()
    while len(attempts) < 3:
        ok, body = await lc.readiness()
        assert not ok
        await asyncio.sleep(0.02)
    ok, body = await lc.readiness()
    assert not ok
    assert body["reason"] == (
        "feedback-recovery failed 2 time(s), retrying; last error: OSError: Input/output error"
    )
    assert body["startup"] == {
        "feedback-recovery": {
            "attempts": 3,
            "failures": 2,
            "last_error": "OSError: Input/output error",
        }
    }
    assert "/var/lib" not in str(body)
    # 0.2 s then 0.4 s (+-20%): exponential, not a busy loop
    assert 0.15 <= attempts[1] - attempts[0] <= 0.5
    assert 0.3 <= attempts[2] - attempts[1] <= 0.8
    release.set()
    for _ in range(100):
        ok, body = await lc.readiness()
        if ok:
            break
        await asyncio.sleep(0.01)
    assert ok, body
    assert "startup" not in body
    await lc.shutdown()


async def test_startup_retries_stop_when_shutdown_begins() -> None:
    lc = Lifecycle(Settings(grace_ms=1_000, drain_delay_ms=0))
    attempts = 0

    async def always_failing() -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("sink down")

    lc.on_startup("t", always_failing)
    await lc.startup()
    await asyncio.sleep(0.05)
    await lc.shutdown()
    seen = attempts
    await asyncio.sleep(0.5)
    assert seen == attempts == 1


class _Custom(BaseException):
    """A BaseException that is neither Exception nor a cancellation."""


async def _raise_cancelled(deadline: float) -> None:
    # What a hook sees when it awaits a future another task cancelled.
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    fut.cancel()
    await fut


async def _raise_timeout(deadline: float) -> None:
    raise TimeoutError("the hook's own network call timed out")


def _raiser(exc: BaseException) -> Callable[[float], Awaitable[None]]:
    async def hook(deadline: float) -> None:
        raise exc

    return hook


@pytest.mark.parametrize(
    "hook",
    [
        _raiser(RuntimeError("boom")),
        _raise_cancelled,
        _raiser(KeyboardInterrupt()),
        _raiser(SystemExit(3)),
        _raiser(_Custom()),
        _raise_timeout,
    ],
    ids=[
        "Exception",
        "CancelledError",
        "KeyboardInterrupt",
        "SystemExit",
        "BaseException",
        "own-TimeoutError",
    ],
)
async def test_any_exception_in_a_hook_is_isolated(
    hook: Callable[[float], Awaitable[None]], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 11, defect 8: a hook raising anything (BaseException included) is logged and
    reported as failed; the hooks after it still run and the lifecycle still stops."""
    lc = Lifecycle(Settings(grace_ms=2_000, drain_delay_ms=0))
    ran: list[str] = []

    async def drain(deadline: float) -> None:
        ran.append("drain")

    lc.on_shutdown("bad", hook)
    lc.on_shutdown("feedback-drain", drain)
    await lc.shutdown()
    assert ran == ["drain"]
    assert lc.failed == ["bad"]
    assert lc.unfinished == []
    assert lc.state.phase is Phase.STOPPED
    assert "shutdown hook bad failed" in caplog.text


async def test_cancelling_the_shutdown_itself_is_not_swallowed() -> None:
    """A cancellation of the shutdown (not raised by a hook) propagates and names what did
    not run: the hook isolation must not make the shutdown uncancellable."""
    lc = Lifecycle(Settings(grace_ms=5_000, drain_delay_ms=0))
    started = asyncio.Event()
    ran: list[str] = []

    async def slow(deadline: float) -> None:
        started.set()
        await asyncio.sleep(10)

    async def later(deadline: float) -> None:
        ran.append("later")

    lc.on_shutdown("slow", slow)
    lc.on_shutdown("later", later)
    task = asyncio.create_task(lc.shutdown())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == []
    assert lc.unfinished == ["slow", "later"]
    assert lc.failed == []


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        (
            "could not connect to postgresql://app:hunter2@db/x",
            "could not connect to postgresql://db/<path>",
        ),
        ("redis://:s3cret@cache:6379/0 refused", "redis://cache:6379/<path> refused"),
        ("bad url file:///etc/shadow here", "bad url <path> here"),
        ("file:relative/x.db", "<path>"),
        ("unable to open data/app.db for writing", "unable to open <path>"),
        ("cannot open /var/my dir/app.db: busy", "cannot open <path>: busy"),
        ("no such file '/srv/my dir/x.db'", "no such file '<path>'"),
        ("./rel/x failed", "<path>"),
        ("~/x/y gone", "<path>"),
        ("C:\\Users\\me\\x.db missing", "<path>"),
        ("host=db password=hunter2 user=app", "host=db password=<redacted> user=app"),
        ("plain message, 3 retries", "plain message, 3 retries"),
    ],
)
def test_describe_error_keeps_credentials_and_paths_out_of_probe_bodies(
    message: str, shown: str
) -> None:
    from sf_lifecycle._redact import describe_error

    text = describe_error(RuntimeError(message))
    assert text == f"RuntimeError: {shown}"
    for secret in ("hunter2", "s3cret", "shadow", "app.db", "x.db", "my dir", "Users"):
        assert secret not in text
    assert describe_error(FileNotFoundError(2, "No such file", "/srv/a b")) == (
        "FileNotFoundError: No such file"
    )
