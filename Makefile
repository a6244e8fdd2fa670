# The README's commands. Each one does its own set-up first (idempotent: scripts/setup.sh).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
NP    ?= 4
RUN   := launch/local
DEMO_DIR ?= runs/demo

.PHONY: help setup demo test test-serial test-mpi clean horovod

help:
	@echo "make demo   - set up, then train on 4 MPI ranks on real data (D-GraB + RegTop-k 1%); runs/demo/{metrics.jsonl,curves.png}"
	@echo "make test   - set up, then the serial tests and the MPI tests (mpirun -n $(NP))"
	@echo "make setup  - only the set-up (Debian packages, $(VENV), pinned CPU torch, this package)"
	@echo "make horovod - build Horovod 0.28.1 against the installed torch (optional --sync horovod)"
	@echo "make horovod - build Horovod 0.28.1 (torch + MPI) into $(VENV); skipped when it imports"

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

# The Horovod backend is optional: its build (~5 min, skipped when it already imports) runs here so
# that its tests run; if the build fails, say so loudly and run the rest (its tests then skip).
test: setup
	@$(MAKE) --no-print-directory horovod || echo "WARNING: the Horovod build failed; Horovod tests will be skipped (see above)"
	@$(MAKE) --no-print-directory test-serial test-mpi

test-serial:
	$(PY) -m pytest -q tests

test-mpi:
	timeout 1200 $(RUN) -n $(NP) -- $(PY) -m pytest -q --only-mpi -p no:cacheprovider tests

clean:
	rm -rf runs .pytest_cache build *.egg-info

# Optional synchronous backend (--sync horovod): builds the patched 0.28.1 sdist, ~5 min on 2 cores.
horovod: setup
	@VENV=$(VENV) bash scripts/build_horovod.sh
