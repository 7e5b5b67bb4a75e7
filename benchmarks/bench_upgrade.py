"""Failed requests per upgrade through real Traefik: sf-lifecycle replicas against plain uvicorn.

Each round is one run of the demo's upgrade flow (`examples.demo.run`): Traefik in front of `sf`,
a bounded load of reads, slow reads and feedback writes, then candidate up, SIGTERM `sf`, new `sf`,
candidate retired. The same flow runs with `sf-lifecycle serve` replicas and with plain uvicorn
replicas of the same app, alternating round by round, at about 100 and 200 requests/s.

The load runs on threads of this process; the replicas and Traefik are separate processes, all on
127.0.0.1. Goal: 0 failed requests per upgrade at both rates, and a median SIGTERM-to-exit under
3 s with `SF_DRAIN_AFTER_PROBES=1` (the demo sets it).
"""

from __future__ import annotations

import functools
from typing import Any

from benchmarks._common import Stats, interleave, make_result
from examples import demo

EXIT_GOAL_S = 3.0


def _upgrade(baseline: bool, rate: float) -> demo.Summary:
    return demo.run(
        demo.Options(
            baseline=baseline,
            flow="pool",  # the same replace-in-one-pool flow for both runners
            rate=rate,
            sse_clients=0,
            warmup_s=2.0,
            cooldown_s=1.0,
            quiet=True,
        )
    )


def run(quick: bool) -> list[dict[str, Any]]:
    rounds = 1 if quick else 5
    rates = (100.0,) if quick else (100.0, 200.0)
    rows: list[dict[str, Any]] = []
    for rate in rates:
        ours, plain = interleave(
            rounds,
            functools.partial(_upgrade, False, rate),
            functools.partial(_upgrade, True, rate),
        )
        failed = Stats.of([float(s.failed_total) for s in ours])
        failed_plain = Stats.of([float(s.failed_total) for s in plain])
        sent = Stats.of([float(s.sent) for s in ours])
        rows.append(
            make_result(
                f"failed requests per upgrade at ~{rate:g} req/s",
                "requests",
                failed,
                failed_plain,
                "plain uvicorn replicas",
                "0",
                failed.high == 0,
                detail=f"median {sent.median:.0f} requests per upgrade; {rounds} upgrades each",
            )
        )
        # The upgraded replica (sf-v1) and the retired candidate: the two SIGTERMs under load.
        exits = [st.to_exit_s or 0.0 for s in ours for st in s.stops[:2]]
        exit_stats = Stats.of(exits)
        rows.append(
            make_result(
                f"SIGTERM to exit under load at ~{rate:g} req/s (SF_DRAIN_AFTER_PROBES=1)",
                "s",
                exit_stats,
                None,
                "",
                f"< {EXIT_GOAL_S:g} s",
                exit_stats.median < EXIT_GOAL_S,
                detail=f"worst {exit_stats.high:.2f} s over {len(exits)} SIGTERMs",
            )
        )
    return rows


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
