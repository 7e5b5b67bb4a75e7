"""The gate of a rollout step, as pure arithmetic on Traefik's per-service counters.

Nothing here does I/O: the rollout (`_rollout.py`) reads the counters and the candidate's
requests in flight and asks `Gate` whether a step passes, so every threshold can be tested on
its own. How the gate judges (5xx ratio against `--min-requests`, p99 against the stable's,
hanging requests) is told in `_rollout.py`'s docstring and ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._prometheus import ServiceStats

__all__ = ["HANGING_SHARE", "Gate", "fmt_s"]

#: The share of a candidate's requests that may run longer than the latency limit (p99).
HANGING_SHARE = 0.01


def fmt_s(seconds: float | None) -> str:
    """`0.25` -> `250ms`, `2` -> `2.00s`, None -> `-` (the rollout's messages)."""
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


@dataclass(frozen=True, slots=True)
class Gate:
    """What a step must satisfy; the arithmetic lives here so it can be tested on its own.

    Args:
        max_error_rate: Largest share of the candidate's requests that may answer 5xx.
        max_latency_ratio: Largest candidate p99 / stable p99.
        latency_floor_s: A candidate p99 at or under this never breaches.
        min_requests: Requests the candidate must serve in a hold to be judged.
    """

    max_error_rate: float = 0.01
    max_latency_ratio: float = 2.0
    latency_floor_s: float = 0.1
    min_requests: int = 20

    def error_breach(self, candidate: ServiceStats, stable: ServiceStats) -> str | None:
        """A reason when the candidate fails too often; judged at any time during the hold."""
        if candidate.errors <= 0:
            return None
        judged = max(candidate.requests, float(self.min_requests))
        if candidate.errors / judged <= self.max_error_rate:
            return None
        reason = (
            f"candidate answered 5xx to {candidate.errors:.0f} of {candidate.requests:.0f} "
            f"requests ({candidate.error_ratio:.1%}), over --max-error-rate "
            f"{self.max_error_rate:.1%}; stable {stable.error_ratio:.1%}"
        )
        if stable.requests >= self.min_requests and stable.error_ratio > self.max_error_rate:
            reason += " (the stable fails too: check shared dependencies)"
        return reason

    def latency_limit_s(self, stable_reference: ServiceStats) -> float | None:
        """max(stable p99 x ratio, floor); None without enough stable traffic to compare."""
        s = stable_reference.p99_s()
        if s is None or stable_reference.requests < self.min_requests:
            return None
        return max(s * self.max_latency_ratio, self.latency_floor_s)

    def end_of_hold(
        self,
        candidate: ServiceStats,
        stable_reference: ServiceStats,
        hanging: int = 0,
        hang_limit_s: float | None = None,
    ) -> str | None:
        """A reason when the finished hold does not let the candidate pass.

        Args:
            candidate: The candidate's requests that ended during the hold.
            stable_reference: The stable's over the whole rollout.
            hanging: The candidate's requests still running after more than `hang_limit_s`;
                Traefik's metrics cannot see them yet. They count as slower than every bucket.
            hang_limit_s: The limit `hanging` was counted against (for the message).
        """
        if hanging > 0 and hanging > HANGING_SHARE * (candidate.requests + hanging):
            return (
                f"{hanging} of the candidate's requests still running after more than "
                f"{fmt_s(hang_limit_s)} (the latency limit), "
                f"{hanging / (candidate.requests + hanging):.1%} of "
                f"{candidate.requests + hanging:.0f}: more than {HANGING_SHARE:.0%} hang"
            )
        candidate = candidate.with_unfinished(hanging)
        if candidate.requests < self.min_requests:
            return (
                f"candidate served {candidate.requests:.0f} requests in the hold, fewer than "
                f"--min-requests {self.min_requests}: not enough traffic to judge it "
                f"(lengthen --hold or lower --min-requests)"
            )
        reason = self.error_breach(candidate, stable_reference)
        if reason:
            return reason
        c, s = candidate.p99_s(), stable_reference.p99_s()
        limit = self.latency_limit_s(stable_reference)
        if c is None or s is None or limit is None:
            return None  # no stable reference: the latency gate cannot apply
        if c > limit:
            return (
                f"candidate p99 {fmt_s(c)} over {fmt_s(limit)} (stable p99 {fmt_s(s)} x "
                f"--max-latency-ratio {self.max_latency_ratio:g}, floor "
                f"{fmt_s(self.latency_floor_s)})"
            )
        return None
