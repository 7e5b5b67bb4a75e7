"""Shared pieces of `check-infra`: findings, durations, `${VAR:-default}` and the budget."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._config import _DEFAULTS, parse_ms

Severity = Literal["error", "warning"]

#: The built-in defaults, whatever the environment or a `serve` command line in force holds.
DEFAULTS = _DEFAULTS
GRACE_VAR, DELAY_VAR = "SF_RPC_SHUTDOWN_GRACE_MS", "SF_DRAIN_DELAY_MS"
HEALTH_PATH = "/api/healthz"
#: Name suffix of a blue/green candidate (service, workload, pool): `sf` and `sf-candidate`.
CANDIDATE_SUFFIX = "-candidate"
#: Traefik's defaults (Go durations) when a health check omits them.
TRAEFIK_INTERVAL, TRAEFIK_TIMEOUT = "30s", "5s"
#: Docker's default stop timeout when `stop_grace_period` is absent.
COMPOSE_STOP_MS = 10_000
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Pod"}


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found in one file.

    Attributes:
        severity: `error` (unsafe: exit non-zero) or `warning`.
        file: The file, as given on the command line or found in a directory.
        message: What is wrong and how to fix it.
    """

    severity: Severity
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper():7} {self.file}: {self.message}"


# -- values -----------------------------------------------------------------------------------
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_duration_ms(value: object) -> float:
    """Milliseconds of a Go/Compose duration (`610s`, `1m30s`, `500ms`); a bare number is seconds.

    Raises:
        ValueError: not a duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        return float(value) * 1000
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text) * 1000
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_MS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {value!r} (expected e.g. 610s, 1m30s, 500ms)")
    return total


def fmt_ms(ms: float) -> str:
    return f"{ms / 1000:g} s"


_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_]\w*))")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Resolve Compose-style `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$VAR` in `value`."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        current = env.get(name)
        if op in (":-", ":?"):
            return current if current else (arg if op == ":-" else "")
        if op in ("-", "?"):
            return current if current is not None else (arg if op == "-" else "")
        if op in (":+", "+"):
            return arg if (current if op == ":+" else current is not None) else ""
        return current or ""

    return _VAR.sub(sub, value)


def as_dict(value: object, env: Mapping[str, str]) -> dict[str, str]:
    """Compose `environment`/`labels`, as a mapping or a `KEY=VALUE` list, interpolated."""
    pairs: list[tuple[object, object]] = []
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list):
        for item in value:
            key, _, val = str(item).partition("=")
            pairs.append((key, val))
    return {str(k): interpolate("" if v is None else scalar(v), env) for k, v in pairs}


def scalar(v: object) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def lower_keys(obj: Any) -> Any:
    # Traefik reads its configuration case-insensitively (`healthCheck` == `healthcheck`).
    if isinstance(obj, Mapping):
        return {str(k).lower(): lower_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [lower_keys(v) for v in obj]
    return obj


#: Margin on top of the grace budget for the kill timeout: the watchdog ends the process 0.3 s
#: after the budget and the teardown needs a moment, but the runtime's own delays (signal
#: delivery, a slow container stop, a busy node) are not the library's to bound. 10 s: the
#: reference files' 610 s for the default 600 s budget.
KILL_MARGIN_MS = 10_000
#: Paths that gate on readiness: what a proxy or a readiness probe may poll (`_health`).
READINESS_PATHS = frozenset({HEALTH_PATH, "/api/ready"})
#: Paths that fail during drain or recovery: a liveness probe there restarts a draining pod.
LIVENESS_PATH = "/api/livez"


@dataclass(frozen=True)
class HealthPaths:
    """The health paths of one service, under the `SF_HEALTH_PREFIX` of its environment."""

    healthz: str = HEALTH_PATH
    readiness: frozenset[str] = READINESS_PATHS
    livez: str = LIVENESS_PATH

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HealthPaths:
        """As `Settings` reads it: empty or unset is `/api`, `/` the root. A value `serve`
        would refuse is left to the default here (`serve` names it at start)."""
        raw = env.get("SF_HEALTH_PREFIX", "").strip()
        if not raw:
            return cls()
        prefix = "" if raw == "/" else raw
        return cls(
            f"{prefix}/healthz",
            frozenset({f"{prefix}/healthz", f"{prefix}/ready"}),
            f"{prefix}/livez",
        )


@dataclass
class Budget:
    """The one rule (README, "The budget rule"): the grace budget counts from the signal and
    contains the drain delay, which must be shorter than it; the orchestrator's kill timeout
    must be at least the budget plus `KILL_MARGIN_MS` (plus any preStop sleep): 610 s for 600 s.
    """

    grace_ms: int
    delay_ms: int
    problems: list[str] = field(default_factory=list)

    @property
    def required_ms(self) -> int:
        return self.grace_ms + KILL_MARGIN_MS

    def describe(self) -> str:
        return (
            f"{GRACE_VAR} ({self.grace_ms} ms, from SIGTERM, drain delay included) "
            f"+ {fmt_ms(KILL_MARGIN_MS)} = {fmt_ms(self.required_ms)}"
        )


def ceil_s(ms: float) -> int:
    """Whole seconds, rounded up: what to write in a manifest that takes seconds."""
    return int(-(-ms // 1000))


def read_budget(env: Mapping[str, str]) -> Budget:
    values = {GRACE_VAR: DEFAULTS.grace_ms, DELAY_VAR: DEFAULTS.drain_delay_ms}
    problems: list[str] = []
    for var in values:
        raw = env.get(var, "").strip()
        if not raw:
            continue
        try:
            values[var] = parse_ms(raw)  # the grammar `serve` reads: 600000, 600s, 10m
        except ValueError:
            problems.append(
                f"{var}={raw!r} is not a duration in milliseconds (e.g. 600000, 600s, 10m)"
            )
    if values[DELAY_VAR] >= values[GRACE_VAR]:
        problems.append(
            f"{DELAY_VAR} ({values[DELAY_VAR]} ms) must be shorter than {GRACE_VAR} "
            f"({values[GRACE_VAR]} ms): the budget counts from SIGTERM and must leave time "
            "for in-flight requests and the final queue drain after the drain delay"
        )
    return Budget(values[GRACE_VAR], values[DELAY_VAR], problems)


# -- reporting --------------------------------------------------------------------------------
class Reporter:
    def __init__(self, file: str, out: list[Finding]) -> None:
        self.file, self.out = file, out

    def error(self, message: str) -> None:
        self.out.append(Finding("error", self.file, message))

    def warning(self, message: str) -> None:
        self.out.append(Finding("warning", self.file, message))
