"""Big backlogs: one huge segment drained in bounded memory, a replica starting on 1M records.

1. **Big segment**: N records (1M; quick 300k) in *one* segment file, against the same records
   (the same bytes) in 100k-record segments, each drained to a no-op sink in a fresh child
   process (`python -m benchmarks.bench_backlog drain STATE FILE...`), rounds interleaved. The
   child reports records/s and its peak resident memory over idle: `VmHWM` after the drain
   (reset to the current RSS through `/proc/self/clear_refs` just before it) minus `VmRSS`
   before it. Goals: >= 0.9x the 100k-segment rate, <= 64 MiB over idle.
2. **Start-up with a backlog**: `sf-lifecycle serve` running the example app (the default
   `SqliteSink`) started on a state directory holding N orphaned records (a dead owner's
   100k-record `.draining` files; 100k / 300k / 1M, quick 10k / 30k / 100k): seconds from the
   spawn until the probes answer (`/api/livez` 200, then any answer from `/api/healthz`, which
   is 503 until recovery is done), and until `/api/ready` is 200 (start-up recovery done).
   Baseline: the same server on an empty state directory. Goal: probes answered within 1 s at
   every size; recovery time linear in the records (the scaling series flags a per-record cost that
   grows more than `bench_scaling.SUPERLINEAR_X`).

Run alone: `python -m benchmarks.bench_backlog [--quick]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, Stats, interleave, make_result, scratch_dir
from benchmarks.bench_scaling import APP, _record_payloads, series_rows, size_label
from sf_lifecycle import FeedbackQueue
from sf_lifecycle.testing import ServerProcess, link_segments, write_segment

__all__ = ["run"]

#: Records per segment of the "many segments" layout and of the start-up backlog.
PART = 100_000
#: Goals of the big-segment rows.
RATE_GOAL_X = 0.9
PEAK_GOAL_MIB = 64.0
HEALTH_GOAL_S = 1.0


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peak from here on


def write_parts(directory: Path, n: int, part: int, tag: int) -> list[Path]:
    """Segment files of at most `part` records each, `n` records in all (distinct ids)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, start in enumerate(range(0, n, part)):
        payloads = _record_payloads(min(part, n - start), tag + k)
        paths.append(write_segment(directory / f"part-{n}-{k:04d}", payloads))
    return paths


def concatenate(parts: Sequence[Path], target: Path) -> Path:
    """One segment holding every frame of `parts` (a segment is a concatenation of frames)."""
    with open(target, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    return target


# -- 1. one big segment against 100k-record segments -----------------------------------------
def _drain_child(state: Path, files: Sequence[Path]) -> dict[str, float]:
    """(In the child process) drain `files` as the queue's own segments; rate and peak."""

    async def noop(records: Sequence[Mapping[str, Any]]) -> None:
        return None

    async def main() -> dict[str, float]:
        q = FeedbackQueue(state)
        try:
            link_segments(q, files)
            gc.collect()
            idle = _proc_kib("VmRSS")
            _reset_peak()
            began = time.perf_counter()
            result = await q.drain(noop)
            took = time.perf_counter() - began
            peak = _proc_kib("VmHWM")
        finally:
            await q.close()
        if not result.complete:
            raise RuntimeError(f"drain incomplete: {result}")
        return {
            "delivered": result.delivered,
            "rate": result.delivered / took,
            "over_idle_mib": (peak - idle) / 1024,
        }

    return asyncio.run(main())


def drain_in_child(root: Path, files: Sequence[Path], n: int) -> dict[str, float]:
    """Drain `files` in a fresh interpreter on a fresh state directory under `root`."""
    state = Path(tempfile.mkdtemp(prefix="drain-", dir=root))
    try:
        cmd = [sys.executable, "-m", "benchmarks.bench_backlog", "drain", str(state)]
        out = subprocess.run(
            [*cmd, *map(str, files)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        got: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(state, ignore_errors=True)
    if got["delivered"] != n:
        raise RuntimeError(f"drained {got['delivered']} of {n}")
    return got


def big_segment_rows(root: Path, n: int, rounds: int) -> list[dict[str, Any]]:
    parts = write_parts(root / "parts", n, PART, tag=0x100)
    big = concatenate(parts, root / f"one-{n}")
    samples = interleave(
        rounds,
        partial(drain_in_child, root, [big], n),
        partial(drain_in_child, root, parts, n),
    )
    big.unlink()
    label = size_label(n)
    base_name = f"the same records in {size_label(PART)}-record segments"
    one, many = samples
    rate, rate_base = Stats.of([s["rate"] for s in one]), Stats.of([s["rate"] for s in many])
    peak = Stats.of([s["over_idle_mib"] for s in one])
    peak_base = Stats.of([s["over_idle_mib"] for s in many])
    return [
        make_result(
            f"drain {label} records in one segment to a no-op sink",
            "records/s",
            rate,
            rate_base,
            base_name,
            f">= {RATE_GOAL_X:g}x",
            rate.median >= RATE_GOAL_X * rate_base.median,
        ),
        make_result(
            f"peak RSS over idle while draining {label} records in one segment",
            "MiB",
            peak,
            peak_base,
            base_name,
            f"<= {PEAK_GOAL_MIB:g} MiB",
            peak.median <= PEAK_GOAL_MIB,
        ),
    ]


# -- 2. a replica starting on a backlog ------------------------------------------------------
def start_once(root: Path, parts: Sequence[Path]) -> tuple[float, float]:
    """(seconds until the probes answer, seconds to ready 200) of a server started on a state
    directory holding `parts` as a dead owner's `.draining` files."""
    state = Path(tempfile.mkdtemp(prefix="start-", dir=root))
    server = None
    try:
        if parts:
            owner = FeedbackQueue(state)
            link_segments(owner, parts, orphaned=True)
            asyncio.run(owner.close())  # a dead owner: its files, no lock held
        server = ServerProcess(APP, state_dir=state, env={"SF_DRAIN_DELAY_MS": "0"}, cwd=ROOT)
        began = time.perf_counter()
        server.start()
        _until_200(server, "/api/livez", began, 60)
        server.get("/api/healthz", timeout=5.0)  # answered: 503 while recovering, or 200
        health = time.perf_counter() - began
        ready = _until_200(server, "/api/ready", began, 600)
        return health, ready
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(state, ignore_errors=True)


def _until_200(server: ServerProcess, path: str, began: float, timeout: float) -> float:
    while time.perf_counter() - began < timeout:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.logs()}")
        with contextlib.suppress(OSError):
            if server.get(path, timeout=5.0)[0] == 200:
                return time.perf_counter() - began
        time.sleep(0.005)
    raise TimeoutError(f"{path} not 200 within {timeout} s:\n{server.logs()}")


def startup_rows(root: Path, sizes: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    part = min(sizes)
    parts = write_parts(root / "backlog", max(sizes), part, tag=0x200)
    variants: list[Callable[[], tuple[float, float]]] = [partial(start_once, root, [])]
    variants += [partial(start_once, root, parts[: n // part]) for n in sizes]
    samples = interleave(rounds, *variants)
    empty, by_size = samples[0], samples[1:]
    health_base = Stats.of([h for h, _ in empty])
    rows = [
        make_result(
            f"start-up on {size_label(n)} queued records: /api/livez 200, /api/healthz answered",
            "s",
            Stats.of([h for h, _ in got]),
            health_base,
            "the same server on an empty state dir",
            f"<= {HEALTH_GOAL_S:g} s",
            Stats.of([h for h, _ in got]).median <= HEALTH_GOAL_S,
        )
        for n, got in zip(sizes, by_size, strict=True)
    ]
    ready_base = Stats.of([r for _, r in empty])
    rows += series_rows(
        lambda n: f"scaling: start-up on {size_label(n)} queued records, until ready",
        "s",
        "record",
        sizes,
        [Stats.of([r for _, r in got]) for got in by_size],
        [ready_base for _ in sizes],
        "the same server on an empty state dir",
        lambda n, seconds: seconds / n,
        [f"{-(-n // part)} orphaned file(s) into SQLite, then ready" for n in sizes],
    )
    return rows


# -- the module's entry point ----------------------------------------------------------------
def run(quick: bool) -> list[dict[str, Any]]:
    """Rows for `benchmarks/__main__.py`; quick keeps it near 30 s."""
    with scratch_dir("sf-bench-backlog-") as root:
        if quick:
            rows = big_segment_rows(root, 300_000, rounds=2)
            rows += startup_rows(root, [10_000, 30_000, 100_000], rounds=2)
        else:
            rows = big_segment_rows(root, 1_000_000, rounds=3)
            rows += startup_rows(root, [100_000, 300_000, 1_000_000], rounds=2)
        return rows


def _main(argv: list[str]) -> int:
    if argv[:1] == ["drain"]:
        print(json.dumps(_drain_child(Path(argv[1]), [Path(p) for p in argv[2:]])))
        return 0
    began = time.monotonic()
    rows = run("--quick" in argv)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        base = "" if r["baseline_value"] is None else f"  baseline {r['baseline_value']:,.4g}"
        ratio = "" if r["ratio"] is None else f"  ratio {r['ratio']:.2f}"
        mark = {True: "met", False: "MISSED", None: ""}[r["met"]]
        print(f"{r['name']:<{width}}  {r['value']:>12,.4g} {r['unit']:<9}{base}{ratio}  {mark}")
        if r.get("detail"):
            print(f"    {r['detail']}")
    print(f"took {time.monotonic() - began:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
