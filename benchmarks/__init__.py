"""sf-lifecycle's benchmarks, each measured against a baseline run beside it.

Run them with `make bench` (or `python -m benchmarks [--quick] [--only NAME]`). Every
`benchmarks/bench_*.py` module exposes `run(quick: bool) -> list[dict]`; the runner in
`__main__.py` collects the rows into one table and `benchmarks/results/latest.json`.
"""
