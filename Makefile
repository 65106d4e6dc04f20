# Shipyard's developer commands. Each target sets up what it needs first (scripts/bootstrap.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo demo-containers demo-fleet test test-serial test-fast bench check lock fmt clean docs

setup:
	@./scripts/bootstrap.sh

# The demo scans with the real PyPA advisory database when it is beside the checkout.
OSV_DB ?= $(wildcard $(CURDIR)/../shared/data/pypa-advisory-db)

demo: setup
	$(if $(OSV_DB),SHIPYARD_OSV_DB=$(OSV_DB)) $(VENV)/bin/shipyard demo

# The same story with an image service on Docker Engine; starts dockerd (vfs, no bridge) unless
# DOCKER_HOST or the default socket answers. Needs docker.io and busybox-static.
demo-containers: setup
	$(if $(OSV_DB),SHIPYARD_OSV_DB=$(OSV_DB)) $(VENV)/bin/shipyard demo --containers

# Three regions joined over mutual TLS (agents on 127.0.0.2-4), one deployment in lockstep.
demo-fleet: setup
	$(if $(OSV_DB),SHIPYARD_OSV_DB=$(OSV_DB)) $(VENV)/bin/shipyard demo --fleet

# The suite on several workers (pytest-xdist, docs/architecture.md "Testing"): most tests wait on
# real processes (serve, agents, apps, wrk, dockerd), so more workers than cores pays. loadgroup
# hands out one test at a time, except the modules tests/conftest.py lists in ONE_WORKER_MODULES
# (a stack started once per module), which go to one worker whole; the slowest tests go first.
# `make test-serial` runs it in one process, for debugging (as `pytest` alone does).
TEST_WORKERS ?= 4
XDIST := -n $(TEST_WORKERS) --dist loadgroup

# --durations: the slowest tests are listed at the end of every run, to keep the suite in budget.
test: setup
	$(PY) -m pytest -q $(XDIST) --durations=25

test-serial: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not e2e and not docker"

bench: setup
	$(PY) bench/run.py

check: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The manifest reference in README.md, from the manifest's models (tests/cli/test_manifest_docs.py).
docs: setup
	$(PY) -m shipyard.cli.manifest_docs --readme README.md

fmt: setup
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

# Regenerate the pinned lock from pyproject.toml (needs uv: pip install uv).
lock:
	uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
