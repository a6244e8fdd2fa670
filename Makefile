# The commands of the README and the docs. Each one does its own set-up first (idempotent: scripts/setup.sh).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
NP    ?= 4
RUN   := launch/local
DEMO_DIR ?= runs/demo

.PHONY: help setup demo test test-fast test-serial test-mpi lint docs clean horovod

help:
	@echo "make demo   - set up, then train on 4 MPI ranks on real data (D-GraB + RegTop-k 1%); runs/demo/{metrics.jsonl,curves.png}"
	@echo "make test   - set up, then every lane: the serial tests (unit, system) and the MPI tests (mpirun -n $(NP))"
	@echo "make test-fast - the unit lane: tests/unit, no MPI launcher, no subprocess, not 'slow' (~10 s)"
	@echo "make test-serial - tests/unit + tests/system, 'slow' included"
	@echo "make test-mpi - all of tests/mpi under launch/local -n $(NP) (--only-mpi), 'slow' included"
	@echo "make lint   - ruff and mypy on hpc_dgrab (configured in pyproject.toml)"
	@echo "make docs   - build the documentation site into site/ (mkdocs.yml; strict: a warning or broken link fails)"
	@echo "  lanes: tests/unit (in-process), tests/mpi (@pytest.mark.mpi), tests/system (CLI, Slurm,"
	@echo "  emulated hosts, examples, benchmarks). @pytest.mark.slow: only the unit lane deselects it."
	@echo "make setup  - only the set-up (Debian packages, $(VENV), pinned CPU torch, this package)"
	@echo "make horovod - build Horovod 0.28.1 (torch + MPI) into $(VENV); skipped when it imports"

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

# The Horovod backend is optional: its build (~5 min, skipped when it already imports) runs here so
# that its tests run; if the build fails, say so loudly and run the rest (its tests then skip).
test: setup
	@$(MAKE) --no-print-directory horovod || echo "WARNING: the Horovod build failed; Horovod tests will be skipped (see above)"
	@$(MAKE) --no-print-directory -k test-serial test-mpi

# The unit lane (the developers' inner loop): in-process tests only (tests/conftest.py fails a test
# there that starts a process); 'slow' tests are deselected here and run in every other lane.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests/unit

# Serial: every test outside tests/mpi, slow ones included. pytest-mpi counts every test under a
# directory named "mpi" as an MPI test (node names are keywords): the serial run skips all of
# tests/mpi, and the MPI lane runs all of it, its few in-process tests on every rank.
test-serial:
	$(PY) -m pytest -q --durations=20 tests/unit tests/system

test-mpi:
	timeout 1200 $(RUN) -n $(NP) -- $(PY) -m pytest -q --only-mpi -p no:cacheprovider tests/mpi

lint: setup
	$(PY) -m ruff check hpc_dgrab
	$(PY) -m mypy hpc_dgrab

# The documentation site (mkdocs.yml, docs/): strict, so a warning or a broken link fails the build.
# `$(PY) -m mkdocs serve` previews it at http://127.0.0.1:8000.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf site runs .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# Optional synchronous backend (--sync horovod): builds the patched 0.28.1 sdist, ~5 min on 2 cores.
horovod: setup
	@VENV=$(VENV) bash scripts/build_horovod.sh
