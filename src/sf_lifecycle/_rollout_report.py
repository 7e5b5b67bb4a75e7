"""What a rollout tells: the JSON summary of `sf-lifecycle rollout --json`, step by step.

These dataclasses are serialised with `dataclasses.asdict`, field order included: their fields
are the JSON report's keys, so renaming one changes what scripts reading `--json` see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._gate import fmt_s
from ._prometheus import ServiceStats

__all__ = ["Report", "Samples", "Side", "Step"]

#: `(unix time, {service: (requests, 5xx)})` at each look at the metrics (the HTML report).
Samples = list[tuple[float, dict[str, tuple[float, float]]]]


@dataclass
class Side:
    """One service's traffic in one window."""

    service: str
    requests: int
    errors: int
    error_ratio: float
    p99_s: float | None

    @classmethod
    def of(cls, service: str, s: ServiceStats) -> Side:
        return cls(service, int(s.requests), int(s.errors), round(s.error_ratio, 4), s.p99_s())

    def line(self) -> str:
        return f"{self.service}: {self.requests} req, {self.errors} 5xx, p99 {fmt_s(self.p99_s)}"


@dataclass
class Step:
    weight: int
    held_s: float
    stable: Side
    candidate: Side
    verdict: str  # "ok" or "breach"
    reason: str | None = None


@dataclass
class Report:
    result: str  # promoted, rolled_back, refused, aborted, interrupted, dry_run
    weights_file: str
    service: str | None = None
    stable: str | None = None
    candidate: str | None = None
    weights_before: dict[str, int] = field(default_factory=dict)
    weights_after: dict[str, int] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    reason: str | None = None
    plan: list[str] = field(default_factory=list)
    #: `{"t": unix time, "weights": {...}, "note": ...}` each time Traefik served new weights.
    weights_timeline: list[dict[str, Any]] = field(default_factory=list)
