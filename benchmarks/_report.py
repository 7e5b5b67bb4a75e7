"""Turning result rows into the table, the machine line and `results/latest.json`.

Pure functions (plus one file writer) so they can be tested without running a benchmark.
A row is a dict with the keys in `REQUIRED_KEYS`; `spread`, `baseline_spread`, `detail`, `error`
and `module` are optional and shown when present.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "HEADERS",
    "REQUIRED_KEYS",
    "error_row",
    "fmt_number",
    "machine_info",
    "machine_line",
    "normalize",
    "render_table",
    "write_results",
]

REQUIRED_KEYS = (
    "name",
    "unit",
    "value",
    "baseline_name",
    "baseline_value",
    "ratio",
    "goal",
    "met",
)
HEADERS = (
    "benchmark",
    "sf-lifecycle",
    "baseline",
    "baseline figure",
    "ratio",
    "goal",
    "met",
    "previous run",
)


def fmt_number(value: float | None) -> str:
    """Short, readable figures: `12,345`, `123`, `12.3`, `1.23`, `0.123`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    v = float(value)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _figure(value: float | None, unit: str, spread: Sequence[float] | None) -> str:
    if value is None:
        return "-"
    text = f"{fmt_number(value)} {unit}".strip()
    if spread is not None and len(spread) == 2 and spread[0] != spread[1]:
        text += f" [{fmt_number(spread[0])}..{fmt_number(spread[1])}]"
    return text


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value)


def error_row(module: str, exc: BaseException | str) -> dict[str, Any]:
    """The row standing in for a module that failed, so the rest of the run still reports."""
    message = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return {
        "name": f"{module}: ERROR",
        "unit": "",
        "value": None,
        "baseline_name": "",
        "baseline_value": None,
        "ratio": None,
        "goal": "",
        "met": None,
        "error": message.strip().splitlines()[0][:200] if message.strip() else "error",
        "module": module,
    }


def normalize(row: Any, module: str) -> dict[str, Any]:
    """Check one row against the contract; coerce figures to float, fill in a missing ratio.

    Raises:
        ValueError: The row is not a dict or lacks a required key.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"{module}: result is a {type(row).__name__}, not a dict")
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise ValueError(f"{module}: result {row.get('name', '?')!r} lacks {', '.join(missing)}")
    out = dict(row)
    out["value"] = _as_float(row["value"])
    out["baseline_value"] = _as_float(row["baseline_value"])
    ratio = _as_float(row["ratio"])
    if ratio is None and out["value"] is not None and out["baseline_value"]:
        ratio = out["value"] / out["baseline_value"]
    out["ratio"] = ratio
    met = row["met"]
    out["met"] = None if met is None else bool(met)
    out.setdefault("module", module)
    return out


def _met(row: Mapping[str, Any]) -> str:
    if row.get("error"):
        return "ERROR"
    met = row.get("met")
    return "-" if met is None else ("yes" if met else "NO")


def _key(row: Mapping[str, Any]) -> tuple[str, str]:
    return str(row.get("name")), str(row.get("baseline_name"))


def _previous(row: Mapping[str, Any] | None) -> str:
    if row is None or row.get("error"):
        return "-"
    if row.get("ratio") is not None:
        return f"{row['ratio']:.2f}x"
    return _figure(row.get("value"), str(row.get("unit", "")), None)


def render_table(
    rows: Sequence[Mapping[str, Any]], previous: Sequence[Mapping[str, Any]] = ()
) -> str:
    """One Markdown table (readable as plain text too), then numbered details and errors.

    Args:
        rows: This run's result rows.
        previous: The last run's rows; the same benchmark's ratio (or figure) is shown beside.
    """
    # One benchmark may be compared with several baselines, so the pair is the key.
    before = {_key(r): r for r in previous if isinstance(r, Mapping)}
    body: list[tuple[str, ...]] = []
    notes: list[str] = []
    for row in rows:
        name = str(row["name"])
        if row.get("error"):
            notes.append(f"{name}: {row['error']}")
            name += f" [{len(notes)}]"
        elif row.get("detail"):
            notes.append(f"{name}: {row['detail']}")
            name += f" [{len(notes)}]"
        ratio = row.get("ratio")
        prev = before.get(_key(row))
        body.append(
            (
                name,
                _figure(row.get("value"), str(row.get("unit", "")), row.get("spread")),
                str(row.get("baseline_name") or "-"),
                _figure(
                    row.get("baseline_value"), str(row.get("unit", "")), row.get("baseline_spread")
                ),
                "-" if ratio is None else f"{ratio:.2f}x",
                str(row.get("goal") or "-"),
                _met(row),
                _previous(prev),
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(HEADERS)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(HEADERS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in body]
    if notes:
        out.append("")
        out += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    """What the figures depend on: cores, Python, platform, and how busy the machine was."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        info["load_average"] = None
    return info


def machine_line(date: str, machine: Mapping[str, Any], quick: bool) -> str:
    """`2025-01-01T12:00:00Z on Linux-..., 2 cores, CPython 3.11.7, load 1.2 (quick run)`."""
    load = machine.get("load_average")
    load_text = f", load average {load[0]:g}" if load else ""
    return (
        f"{date} on {machine.get('platform')}, {machine.get('cores')} cores, "
        f"{machine.get('implementation', 'Python')} {machine.get('python')}{load_text}"
        f"{' (quick run)' if quick else ''}"
    )


def write_results(directory: Path, report: Mapping[str, Any]) -> Path:
    """Write `latest.json`, after moving the previous run's `latest.json` to `previous.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    latest = directory / "latest.json"
    if latest.exists():
        os.replace(latest, directory / "previous.json")
    tmp = directory / "latest.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, latest)
    return latest


def utc_now() -> str:
    """The run's date, ISO 8601 in UTC to the second."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
