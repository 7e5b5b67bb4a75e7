"""The upgrade report: one self-contained HTML file with a timeline of an upgrade.

`sf-lifecycle rollout --report FILE` and `make demo` write it, so an operator can judge an
upgrade by looking at it: where the traffic went, when each replica got SIGTERM, left the pool
and exited, how the weights moved, what failed.

An `UpgradeTimeline` holds what was seen, in seconds from the start of the run:

* `requests`: requests answered per replica (one per request, or counts read from Traefik's
  per-service metrics), how many of them failed and how;
* `instants`: SIGTERM, out of pool, exit (per replica) and SSE reconnects;
* `weights`: the weighted service's weights each time Traefik started serving new ones;
* `summary`: the rows of the text summary, shown as a table under the chart.

Deliberate choices:

* **plotly, with plotly.js inlined** (`include_plotlyjs=True`): the file opens with no network
  and no CDN, and the chart is interactive (hover shows counts, the legend hides a series, a drag
  zooms into the seconds around a SIGTERM). plotly.js is most of the file (about 4.8 MB); the data
  is binned to `bin_s` before it is drawn, so a long run adds little.
* **Imported lazily, an optional extra** (`pip install 'sf-lifecycle[report]'`): nothing imports
  plotly until a report is written; `ReportUnavailable` says how to install it.
* **The data travels with the chart**: the same timeline, binned, is embedded as JSON
  (`<script type="application/json" id="sf-report-data">`), so a script or a test can read what
  the picture shows without scraping it. Its `<`, `>`, `&`, U+2028 and U+2029 are written
  `\\uXXXX`: no text in it can end the element early.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "BIN_S",
    "Instant",
    "ReportUnavailable",
    "Requests",
    "UpgradeTimeline",
    "Weights",
    "render_html",
    "report_path_problem",
    "write_report",
]

#: Width of one bar of the traffic chart: requests per replica per 250 ms.
BIN_S = 0.25
#: Lifecycle instants drawn as lines across the whole chart, and their marker in the lane.
LIFECYCLE = {"SIGTERM": "triangle-down", "out of pool": "diamond", "exit": "square"}
SSE_RECONNECT = "SSE reconnect"
_PALETTE = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
_FAILED = "#d62728"
_INSTALL = "pip install 'sf-lifecycle[report]'"


class ReportUnavailable(RuntimeError):
    """plotly is not installed: the report is an optional extra."""

    def __init__(self) -> None:
        super().__init__(f"the upgrade report needs plotly: {_INSTALL} (make venv does)")


@dataclass(frozen=True, slots=True)
class Requests:
    """`n` requests answered at `t` by `replica` ("" when none answered), `failed` of them
    failed; `what` names the failure (`HTTP 502`, `ConnectError`)."""

    t: float
    replica: str
    n: int = 1
    failed: int = 0
    what: str = ""


@dataclass(frozen=True, slots=True)
class Instant:
    """Something that happened to `replica` at `t`: a `LIFECYCLE` kind or `SSE_RECONNECT`."""

    t: float
    replica: str
    kind: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Weights:
    """From `t` on, Traefik served these weights (service -> weight)."""

    t: float
    weights: Mapping[str, int]
    note: str = ""


@dataclass
class UpgradeTimeline:
    """What a report shows; times are seconds since `started_at` (a Unix time)."""

    title: str
    started_at: float
    requests: list[Requests] = field(default_factory=list)
    instants: list[Instant] = field(default_factory=list)
    weights: list[Weights] = field(default_factory=list)
    summary: list[tuple[str, str]] = field(default_factory=list)
    verdict: str = ""
    #: False draws the verdict in red.
    ok: bool = True
    bin_s: float = BIN_S
    #: Service of the weights -> the replica serving it, for the legend and the colours.
    pools: dict[str, str] = field(default_factory=dict)

    @property
    def end_s(self) -> float:
        times = [r.t for r in self.requests] + [i.t for i in self.instants]
        times += [w.t for w in self.weights]
        return max([0.0, *times])

    def replicas(self) -> list[str]:
        """Every replica named anywhere, in order of first appearance."""
        named = [(r.t, r.replica) for r in self.requests] + [
            (i.t, i.replica) for i in self.instants
        ]
        return list(dict.fromkeys(replica for _, replica in sorted(named) if replica))

    def traffic(self) -> tuple[list[float], dict[str, list[int]]]:
        """Bin starts and, per replica, the requests it answered in each bin."""
        n = max(1, math.ceil((self.end_s + 1e-9) / self.bin_s))
        starts = [round(i * self.bin_s, 6) for i in range(n)]
        per: dict[str, list[int]] = {r: [0] * n for r in self.replicas()}
        for r in self.requests:
            if r.replica:
                per.setdefault(r.replica, [0] * n)[self._bin(r.t, n)] += r.n
        return starts, per

    def failures(self) -> list[dict[str, Any]]:
        """One row per bin with failures: its start, how many failed, by what and where."""
        n = max(1, math.ceil((self.end_s + 1e-9) / self.bin_s))
        bins: dict[int, Counter[str]] = defaultdict(Counter)
        for r in self.requests:
            if r.failed:
                where = r.replica or "no replica"
                bins[self._bin(r.t, n)][f"{r.what or 'failed'} ({where})"] += r.failed
        return [
            {"t": round(i * self.bin_s, 6), "failed": sum(c.values()), "what": dict(c)}
            for i, c in sorted(bins.items())
        ]

    def _bin(self, t: float, n: int) -> int:
        return min(n - 1, max(0, int(t / self.bin_s)))

    def to_json(self) -> dict[str, Any]:
        """The binned data the chart draws, and the summary (embedded in the report)."""
        starts, per = self.traffic()
        return {
            "title": self.title,
            "started_at": self.started_at,
            "bin_s": self.bin_s,
            "bins": starts,
            "requests": per,
            "failures": self.failures(),
            "instants": [asdict(i) for i in sorted(self.instants, key=lambda i: i.t)],
            "weights": [
                {"t": w.t, "weights": dict(w.weights), "note": w.note} for w in self.weights
            ],
            "pools": self.pools,
            "summary": [list(row) for row in self.summary],
            "verdict": self.verdict,
        }

    @classmethod
    def from_rollout(
        cls,
        report: Mapping[str, Any],
        samples: Sequence[tuple[float, Mapping[str, tuple[float, float]]]],
        *,
        started_at: float | None = None,
        title: str = "sf-lifecycle rollout",
    ) -> UpgradeTimeline:
        """The timeline of one `sf-lifecycle rollout`, from what the command saw in Traefik.

        Args:
            report: The rollout's JSON report (with `weights_timeline`).
            samples: `(unix time, {service: (requests, 5xx)})`, cumulative counters read from
                Traefik's metrics at each look during the holds.
            started_at: Time zero; the first sample or weights change when None.
            title: The report's heading.
        """
        timeline = report.get("weights_timeline") or []
        firsts = [s[0] for s in samples[:1]] + [float(w["t"]) for w in timeline[:1]]
        t0 = started_at if started_at is not None else min(firsts, default=0.0)
        tl = cls(title, t0)
        for w in timeline:
            tl.weights.append(Weights(float(w["t"]) - t0, dict(w["weights"]), w.get("note", "")))
        previous: Mapping[str, tuple[float, float]] = {}
        for at, services in samples:
            for service, (requests, errors) in services.items():
                before = previous.get(service, (requests, errors))
                # A counter that went down: Traefik restarted, its counters start at 0 again.
                n = round(requests - before[0] if requests >= before[0] else requests)
                failed = round(errors - before[1] if errors >= before[1] else errors)
                if n or failed:
                    tl.requests.append(
                        Requests(at - t0, service.split("@")[0], n, failed, "HTTP 5xx")
                    )
            previous = {**previous, **services}
        steps = report.get("steps") or []
        tl.summary = [("rollout", str(report.get("result", "?")))]
        for step in steps:
            tl.summary.append(
                (
                    f"step {step['weight']}%",
                    f"{step['verdict']} after {step['held_s']:.1f} s | "
                    f"{_side(step['stable'])} | {_side(step['candidate'])}",
                )
            )
        if report.get("reason"):
            tl.summary.append(("why", str(report["reason"])))
        tl.summary.append(("weights after", _weights_text(report.get("weights_after") or {})))
        tl.verdict = f"rollout {report.get('result', '?')}"
        tl.ok = report.get("result") in ("promoted", "dry_run", "aborted")
        return tl


def _side(side: Mapping[str, Any]) -> str:
    p99 = side.get("p99_s")
    shown = "-" if p99 is None else f"{p99 * 1000:.0f} ms"
    return f"{side['service']} {side['requests']} req, {side['errors']} 5xx, p99 {shown}"


def _weights_text(weights: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in weights.items()) or "-"


# -- drawing ------------------------------------------------------------------------------------
def _colors(names: Iterable[str]) -> dict[str, str]:
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(names)}


def _figure(tl: UpgradeTimeline) -> Any:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        raise ReportUnavailable() from None

    starts, per = tl.traffic()
    colors = _colors(per)
    lanes = [*per, *sorted({i.replica for i in tl.instants} - set(per) - {""})]
    reconnects = [i for i in tl.instants if i.kind == SSE_RECONNECT]
    if reconnects:
        lanes.append("SSE clients")
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        row_heights=[0.55, 0.2, 0.25],
        subplot_titles=(
            f"requests answered per replica per {tl.bin_s * 1000:.0f} ms",
            "weights served by Traefik (%)",
            "lifecycle instants and SSE reconnects",
        ),
    )
    # Each bin drawn from its start to its end ("hv" steps from the bin's start; a last point
    # closes the last bin), so a replica's traffic ends where its exit line is, not half a
    # bin later.
    edges = [*starts, round(starts[-1] + tl.bin_s, 6)]
    for replica, counts in per.items():
        fig.add_trace(
            go.Scatter(
                x=edges,
                y=[*counts, counts[-1]],
                name=replica,
                legendgroup="traffic",
                legendgrouptitle_text="requests",
                stackgroup="traffic",
                mode="lines",
                line={"width": 0.5, "color": colors[replica], "shape": "hv"},
                hovertemplate=f"{replica}: %{{y}} req<extra>%{{x:.2f}} s</extra>",
            ),
            row=1,
            col=1,
        )
    fails = tl.failures()
    fig.add_trace(
        go.Scatter(
            x=[f["t"] + tl.bin_s / 2 for f in fails],
            y=[f["failed"] for f in fails],
            name=f"failed ({sum(f['failed'] for f in fails)})",
            legendgroup="traffic",
            mode="markers",
            marker={"symbol": "x", "size": 10, "color": _FAILED, "line": {"width": 1}},
            text=[", ".join(f"{k}: {v}" for k, v in f["what"].items()) for f in fails],
            hovertemplate="%{y} failed: %{text}<extra>%{x:.2f} s</extra>",
        ),
        row=1,
        col=1,
    )
    services = list(dict.fromkeys(k for w in tl.weights for k in w.weights))
    spare = iter(_PALETTE[len(colors) :] + _PALETTE)
    end = tl.end_s
    for service in services:
        shown = tl.pools.get(service, service)
        color = colors.get(shown) or next(spare)
        xs = [w.t for w in tl.weights] + [end]
        ys = [w.weights.get(service, 0) for w in tl.weights]
        ys.append(ys[-1])
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                name=service if shown == service else f"{service} ({shown})",
                legendgroup="weights",
                legendgrouptitle_text="weights",
                mode="lines",
                line={"shape": "hv", "width": 2.5, "color": color},
                text=[w.note for w in tl.weights] + [""],
                hovertemplate=f"{service} %{{y}}%  %{{text}}<extra>%{{x:.2f}} s</extra>",
            ),
            row=2,
            col=1,
        )
    for kind, symbol in LIFECYCLE.items():
        marks = [i for i in tl.instants if i.kind == kind]
        if not marks:
            continue
        fig.add_trace(
            go.Scatter(
                x=[i.t for i in marks],
                y=[i.replica for i in marks],
                name=kind,
                legendgroup="instants",
                legendgrouptitle_text="instants",
                mode="markers",
                marker={
                    "symbol": symbol,
                    "size": 13,
                    "color": [colors.get(i.replica, "#444") for i in marks],
                    "line": {"width": 1, "color": "#222"},
                },
                text=[i.detail for i in marks],
                hovertemplate=f"{kind} %{{y}} %{{text}}<extra>%{{x:.2f}} s</extra>",
            ),
            row=3,
            col=1,
        )
        for i in marks:
            fig.add_vline(
                x=i.t,
                line={"color": colors.get(i.replica, "#444"), "width": 1, "dash": "dot"},
                opacity=0.7,
            )
    if reconnects:
        fig.add_trace(
            go.Scatter(
                x=[i.t for i in reconnects],
                y=["SSE clients"] * len(reconnects),
                name=f"{SSE_RECONNECT}s ({len(reconnects)})",
                legendgroup="instants",
                mode="markers",
                marker={
                    "symbol": "circle-open",
                    "size": 10,
                    "color": [colors.get(i.replica, "#444") for i in reconnects],
                    "line": {"width": 2},
                },
                text=[f"to {i.replica} {i.detail}".strip() for i in reconnects],
                hovertemplate="reconnect %{text}<extra>%{x:.2f} s</extra>",
            ),
            row=3,
            col=1,
        )
    fig.update_yaxes(title_text="requests", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(range=[-5, 105], tickvals=[0, 50, 100], row=2, col=1)
    fig.update_yaxes(
        type="category", categoryorder="array", categoryarray=lanes[::-1], row=3, col=1
    )
    fig.update_xaxes(title_text="seconds since start", row=3, col=1)
    fig.update_layout(
        template="plotly_white",
        height=720,
        margin={"l": 70, "r": 20, "t": 40, "b": 50},
        legend={"groupclick": "toggleitem", "tracegroupgap": 18, "traceorder": "grouped"},
        hovermode="closest",
        font={"size": 13},
    )
    return fig


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1200px;
color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}.meta{color:#666;margin:0 0 10px}
.verdict{font-weight:600;font-size:17px;margin:6px 0 12px}.ok{color:#2a7a2a}.bad{color:#c62828}
table{border-collapse:collapse;font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
td{padding:3px 14px 3px 0;vertical-align:top;border-bottom:1px solid #eee}
td:first-child{white-space:nowrap;color:#555}
"""


def render_html(tl: UpgradeTimeline) -> str:
    """The report as one HTML document: the chart (plotly.js inlined), the summary table, and
    the data as JSON. Raises `ReportUnavailable` without plotly."""
    fig = _figure(tl)
    chart = fig.to_html(
        full_html=False,
        include_plotlyjs=True,
        div_id="sf-timeline",
        config={"displaylogo": False, "responsive": True},
    )
    rows = "\n".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in tl.summary
    )
    data = _script_json(tl.to_json())
    when = datetime.fromtimestamp(tl.started_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    verdict = (
        f'<p class="verdict {"ok" if tl.ok else "bad"}">{html.escape(tl.verdict)}</p>'
        if tl.verdict
        else ""
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(tl.title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{html.escape(tl.title)}</h1>"
        f'<p class="meta">started {when}, {tl.end_s:.1f} s shown</p>\n{verdict}\n'
        f"{chart}\n<h2>Summary</h2>\n<table>\n{rows}\n</table>\n"
        f'<script type="application/json" id="sf-report-data">{data}</script>\n'
        "</body></html>\n"
    )


#: Characters that must not appear raw inside a `<script>` element: `<` and `>` could open a
#: comment or a tag (`<!--<script>` makes the HTML parser skip the closing `</script>`), `&`
#: for good measure, U+2028/U+2029 end a line in older JavaScript.
_SCRIPT_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_SCRIPT_UNSAFE = re.compile("[<>&\u2028\u2029]")


def _script_json(data: Any) -> str:
    """`data` as JSON that is safe inside `<script>`: the characters above as `\\uXXXX`, which
    JSON.parse reads back as the same text."""
    text = json.dumps(data, separators=(",", ":"))
    return _SCRIPT_UNSAFE.sub(lambda m: _SCRIPT_ESCAPES[m.group()], text)


def report_path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a report cannot be written at `path`, or None: checked before an upgrade starts, so
    a typo fails at once instead of after the run.

    Missing directories are fine (`write_report` creates them) when the nearest existing one
    takes new files; that is tried with an unnamed temporary file, which also catches a
    read-only file system and permissions root does not bypass.
    """
    target = Path(path)
    existing = target.parent
    try:
        if target.is_dir():
            return "is a directory (give a file name)"
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} is not a directory"
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"cannot create a file in {existing}: {exc.strerror or exc}"
    return None


def write_report(tl: UpgradeTimeline, path: str | os.PathLike[str]) -> Path:
    """Write the report to `path` atomically (a temporary file renamed over it); return it.

    Raises:
        ReportUnavailable: plotly is not installed.
        OSError: the file cannot be written; the message names `path` (not the temporary
            file).
    """
    target = Path(path)
    document = render_html(tl)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise _not_written(target, exc) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(document)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _not_written(target, exc) from exc
        raise
    return target


def _not_written(target: Path, exc: OSError) -> OSError:
    return OSError(f"cannot write {target}: {exc.strerror or exc}")
