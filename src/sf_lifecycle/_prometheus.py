"""The part of Prometheus' text exposition format that `rollout` reads from Traefik's `/metrics`.

Only two families matter: `traefik_service_requests_total{service, code, ...}` (a counter) and
`traefik_service_request_duration_seconds_bucket{service, le, ...}` (a cumulative histogram). A
small parser of sample lines is enough for that, and keeps `prometheus_client` out of the
dependencies; it still handles the whole line grammar (escaped label values, `+Inf`, `NaN`,
optional timestamps) so an unrelated family can never make a rollout fail.

`ServiceStats` is what one scrape says about one Traefik service; subtracting two of them gives
the traffic of a time window, which is what the rollout gate judges.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

__all__ = [
    "Sample",
    "ServiceStats",
    "histogram_quantile",
    "parse_samples",
    "process_start",
    "service_stats",
]

REQUESTS = "traefik_service_requests_total"
DURATION_BUCKET = "traefik_service_request_duration_seconds_bucket"
SERVICE_FAMILIES = "traefik_service_"
PROCESS_START = "process_start_time_seconds"

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,)?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample line: metric name, labels, value."""

    name: str
    labels: Mapping[str, str]
    value: float


def _value(text: str) -> float:
    low = text.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    return float(text)  # also "NaN"; raises ValueError on garbage


def parse_samples(text: str) -> Iterator[Sample]:
    """Every sample in a text-format exposition, in order.

    Raises:
        ValueError: a line that is not a comment, blank, or a valid sample (the message names
            the line number and its text).
    """
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _NAME.match(line)
        if m is None:
            raise ValueError(f"metrics line {lineno}: no metric name: {raw!r}")
        name, pos = m.group(0), m.end()
        labels: dict[str, str] = {}
        if pos < len(line) and line[pos] == "{":
            pos += 1
            while True:
                if line[pos:].lstrip().startswith("}"):
                    pos = line.index("}", pos) + 1
                    break
                lm = _LABEL.match(line, pos)
                if lm is None:
                    raise ValueError(f"metrics line {lineno}: malformed labels: {raw!r}")
                labels[lm.group(1)] = re.sub(
                    r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], lm.group(2)
                )
                pos = lm.end()
                if lm.group(3) is None:
                    rest = line[pos:].lstrip()
                    if not rest.startswith("}"):
                        raise ValueError(f"metrics line {lineno}: malformed labels: {raw!r}")
                    pos = line.index("}", pos) + 1
                    break
        parts = line[pos:].split()
        if not parts or len(parts) > 2:
            raise ValueError(f"metrics line {lineno}: expected a value: {raw!r}")
        try:
            value = _value(parts[0])
        except ValueError:
            raise ValueError(f"metrics line {lineno}: bad value {parts[0]!r}: {raw!r}") from None
        yield Sample(name, labels, value)


@dataclass
class ServiceStats:
    """Counters of one Traefik service: requests, 5xx answers, duration histogram (cumulative).

    `buckets` maps each upper bound in seconds (`math.inf` included) to the number of requests
    that took at most that long, summed over codes and methods.
    """

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def p99_s(self) -> float | None:
        return histogram_quantile(0.99, self.buckets)

    def since(self, earlier: ServiceStats) -> ServiceStats:
        """The traffic between `earlier` and this scrape; never negative.

        Any counter that went down means Traefik restarted in between (its counters start at 0
        again): the whole scrape is then the increase, as Prometheus' `increase()` takes it, for
        every counter at once so requests, errors and buckets stay consistent. A restart whose
        counters have already passed their old values cannot be seen here; the caller compares
        Traefik's start time (`process_start`) for that.
        """
        reset = (
            self.requests < earlier.requests
            or self.errors < earlier.errors
            or any(n < earlier.buckets.get(le, 0.0) for le, n in self.buckets.items())
            or any(le not in self.buckets for le in earlier.buckets)
        )
        if reset:
            return ServiceStats(self.requests, self.errors, dict(self.buckets))
        return ServiceStats(
            requests=self.requests - earlier.requests,
            errors=self.errors - earlier.errors,
            buckets={le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
        )

    def with_unfinished(self, count: int) -> ServiceStats:
        """These counters plus `count` requests still running: counted as slower than every
        bucket (`+Inf`), since a request Traefik has not seen end took at least that long."""
        if count <= 0:
            return self
        buckets = dict(self.buckets)
        buckets[math.inf] = max(self.buckets.values(), default=0.0) + count
        return ServiceStats(self.requests + count, self.errors, buckets)


def service_stats(text: str) -> dict[str, ServiceStats]:
    """Per-service counters from one scrape of Traefik's `/metrics` (keys like `sf@file`).

    Raises:
        ValueError: the text is not the Prometheus text format.
    """
    out: dict[str, ServiceStats] = {}
    for s in parse_samples(text):
        service = s.labels.get("service")
        if service is None or math.isnan(s.value):
            continue
        if s.name.startswith(SERVICE_FAMILIES):
            # Any per-service series (e.g. the health check's `server_up`, present with no
            # traffic at all) shows that Traefik labels its metrics by service.
            out.setdefault(service, ServiceStats())
        if s.name == REQUESTS:
            st = out.setdefault(service, ServiceStats())
            st.requests += s.value
            if s.labels.get("code", "").startswith("5"):
                st.errors += s.value
        elif s.name == DURATION_BUCKET and "le" in s.labels:
            st = out.setdefault(service, ServiceStats())
            le = _value(s.labels["le"])
            st.buckets[le] = st.buckets.get(le, 0.0) + s.value
    return out


def process_start(text: str) -> float | None:
    """Traefik's start time from its `/metrics` (`process_start_time_seconds`), if exposed: a
    different value between two scrapes means Traefik restarted and its counters began at 0."""
    for s in parse_samples(text):
        if s.name == PROCESS_START and not s.labels:
            return s.value
    return None


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The q-quantile of a cumulative histogram, as PromQL's `histogram_quantile` computes it.

    Linear interpolation inside the bucket that holds the rank; the lowest bucket starts at 0;
    a rank in the `+Inf` bucket returns the highest finite bound. None when there is no traffic.
    """
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]] if math.isinf(bounds[-1]) else max(buckets.values())
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower
