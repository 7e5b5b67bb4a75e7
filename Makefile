# Every target creates .venv when it is missing: nothing needs to be installed beforehand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
QUICK  ?=
# pytest-xdist workers for `make test` (most integration tests wait on real processes).
PYTEST_WORKERS ?= 2

.PHONY: help venv chromium test lint fmt typecheck pytest demo demo-rollback demo-baseline bench reliability clean

help:
	@echo "make demo   real Traefik in front of the example server: a gated blue/green upgrade under load;"
	@echo "            writes the upgrade report, .demo/report.html"
	@echo "make demo BACKENDS=postgres,redis  the same on real PostgreSQL and Redis, one state"
	@echo "            directory per replica (many hosts)"
	@echo "make demo-rollback  the same with a bad candidate: the rollout rolls back by itself"
	@echo "make test   ruff, mypy (strict) and pytest, from a fresh clone"
	@echo "make bench  benchmarks against baselines run beside them (QUICK=1 for a short run)"
	@echo "make reliability  the kill, fault and fuzz campaign (ARGS=\"--iterations 300\")"
	@echo "make demo-baseline  the demo's flow with plain uvicorn replicas, for comparison"
	@echo "make chromium  Debian's chromium for the browser tests (apt-get, as root; once)"
	@echo "make lint / fmt / clean"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Playwright drives Debian's Chromium (the browser tests): it never downloads a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,bench,report]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian's chromium for the browser tests and the README's screenshot; skipped once installed.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@echo "installing Debian's chromium (browser tests): apt-get, about a minute"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 chromium >/dev/null
	@test -x $(CHROMIUM) || (echo "chromium did not install at $(CHROMIUM)" >&2; exit 1)

chromium: $(CHROMIUM)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) $(CHROMIUM)
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest -n $(PYTEST_WORKERS) --durations=15
	$(BIN)/coverage combine --quiet || true
	@echo "branch coverage (servers in subprocesses included): $$($(BIN)/coverage report --format=total)%"

test: lint typecheck pytest

# BACKENDS=postgres,redis: real PostgreSQL and Redis for the replicas to share (many hosts).
BACKENDS ?=
DEMO_BACKENDS = $(if $(BACKENDS),--backends $(BACKENDS),)

demo: $(STAMP)
	$(BIN)/python -m examples.demo $(DEMO_BACKENDS) $(DEMO_ARGS)

demo-rollback: $(STAMP)
	$(BIN)/python -m examples.demo --bad-candidate $(DEMO_BACKENDS) $(DEMO_ARGS)

demo-baseline: $(STAMP)
	$(BIN)/python -m examples.demo --baseline $(DEMO_ARGS)

bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null 2>&1 \
		|| echo "wrk could not be installed: the benchmarks use their Python load generator"
	$(BIN)/python -m benchmarks $(if $(QUICK),--quick,)

reliability: $(STAMP)
	$(BIN)/python -m tests.reliability $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis .coverage .coverage.* .demo
