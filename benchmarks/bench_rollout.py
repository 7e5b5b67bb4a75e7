"""Requests failed for users by a bad release: one shared pool against the gated rollout.

Each round starts real Traefik, a stable replica and a candidate that answers 500 to 30 % of
`/api/hello` (`SF_EXAMPLE_FAIL_RATE=0.3`; its health check stays green, as with a real
regression), under the demo's load (~100 requests/s of reads, slow reads and feedback writes,
half of the clients sticky), on 127.0.0.1:

- baseline, the identical-labels pool (the model before weighted routing): the candidate joins
  the production pool the moment it is healthy; an operator who watches the error graphs notices
  and removes it. The operator is modelled as a fixed reaction time of `REACTION_S` (10 s, a
  fast human) from the moment the candidate joined.
- sf-lifecycle: the candidate sits in its own pool at weight 0 and `sf-lifecycle rollout
  --steps 10,50,100 --hold 3s` promotes it, gated on Traefik's metrics; it rolls back by itself.
- the same rollout with a good candidate: nothing may fail (and it must be promoted).

Failed requests are those that did not get a 2xx, counted by the load generator from the
candidate's start until 1 s after the rollback (or the operator's revert, or the promotion).
Goal: at least 10x fewer with the rollout, and 0 for a good candidate.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import Stats, interleave, make_result
from examples import demo
from sf_lifecycle.testing import BlueGreenProxy, ServerProcess, TraefikProxy, free_port, reap

ROOT = Path(__file__).resolve().parents[1]
REACTION_S = 10.0
FAIL_RATE = 0.3
RATE = 100.0
WARMUP_S = 2.0
HOLD = "3s"


def _replica(state: Path, name: str, port: int | None = None, fail: float = 0.0) -> ServerProcess:
    env = {"SF_REPLICA_ID": name, "SF_DRAIN_DELAY_MS": "500", "SF_EXAMPLE_FAIL_RATE": str(fail)}
    return ServerProcess(state_dir=state, env=env, port=port, cwd=ROOT)


def _load(url: str) -> tuple[demo.Load, demo.Summary]:
    summary = demo.Summary()
    load = demo.Load(url, demo.Options(rate=RATE, sse_clients=0, quiet=True), summary)
    load.start()
    return load, summary


def shared_pool(fail: float) -> tuple[int, int | None]:
    """Baseline: the candidate joins the one pool at once; reverted after REACTION_S.

    Returns (failed, None): the same shape as `gated`, which also returns the rollout's exit.
    """
    with contextlib.ExitStack() as stack:
        state = Path(stack.enter_context(tempfile.TemporaryDirectory("-sf-bench")))
        stable = stack.enter_context(_replica(state, "stable"))
        stable.wait_ready()
        proxy = stack.enter_context(TraefikProxy([stable.url]))
        load, summary = _load(proxy.url)
        stack.callback(load.stop.set)
        time.sleep(WARMUP_S)
        before = summary.failed_total
        cand = stack.enter_context(_replica(state, "candidate", fail=fail))
        cand.wait_ready()
        proxy.set_backends([stable.url, cand.url])  # Docker calls it healthy: it is in
        time.sleep(REACTION_S)
        proxy.set_backends([stable.url])  # the operator reverts
        time.sleep(1.0)
        failed = summary.failed_total - before
        load.finish(timeout=1.0)
        return failed, None


def gated(fail: float) -> tuple[int, int | None]:
    """sf-lifecycle: candidate at weight 0, `rollout` promotes or rolls back; (failed, exit)."""
    with contextlib.ExitStack() as stack:
        state = Path(stack.enter_context(tempfile.TemporaryDirectory("-sf-bench")))
        stable = stack.enter_context(_replica(state, "stable"))
        stable.wait_ready()
        port = free_port()
        proxy = stack.enter_context(BlueGreenProxy(stable.url, f"http://127.0.0.1:{port}"))
        load, summary = _load(proxy.url)
        stack.callback(load.stop.set)
        time.sleep(WARMUP_S)
        before = summary.failed_total
        cand = stack.enter_context(_replica(state, "candidate", port, fail))
        cand.wait_ready()
        proxy.wait_until(
            lambda: set(proxy.candidate_status().values()) == {"UP"}, 10, "candidate UP"
        )
        cmd = [
            *(sys.executable, "-m", "sf_lifecycle", "rollout"),
            *("--weights", str(proxy.weights_path), "--traefik", proxy.api_url),
            *("--steps", "10,50,100", "--hold", HOLD, "--interval", "250ms"),
            *("--min-requests", "10", "--max-error-rate", "0.01"),
        ]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            code: int | None = proc.wait(60)
        finally:
            reap(proc, 5)
        time.sleep(1.0)
        failed = summary.failed_total - before
        load.finish(timeout=1.0)
        return failed, code


def run(quick: bool) -> list[dict[str, Any]]:
    rounds = 1 if quick else 3
    pool, bad, good = interleave(
        rounds,
        functools.partial(shared_pool, FAIL_RATE),
        functools.partial(gated, FAIL_RATE),
        functools.partial(gated, 0.0),
    )
    pool_s = Stats.of([float(n) for n, _ in pool])
    bad_s = Stats.of([float(n) for n, _ in bad])
    good_s = Stats.of([float(n) for n, _ in good])
    fewer = pool_s.median / max(bad_s.median, 1.0)
    rolled_back = all(code == 1 for _, code in bad)
    promoted = all(code == 0 for _, code in good)
    return [
        make_result(
            f"requests failed by a bad release ({FAIL_RATE:.0%} of /api/hello), ~{RATE:g} req/s",
            "requests",
            bad_s,
            pool_s,
            f"one shared pool, operator reverts after {REACTION_S:g} s",
            ">= 10x fewer",
            rolled_back and fewer >= 10,
            detail=(
                f"gated rollout 10/50/100, hold {HOLD}: {fewer:.0f}x fewer; rolled back in "
                f"{sum(code == 1 for _, code in bad)}/{rounds} rounds"
            ),
        ),
        make_result(
            "requests failed promoting a good release through the gated rollout",
            "requests",
            good_s,
            None,
            "",
            "0",
            promoted and good_s.high == 0,
            detail=f"promoted in {sum(code == 0 for _, code in good)}/{rounds} rounds",
        ),
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2))
