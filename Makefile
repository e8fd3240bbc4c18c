# Quick start: `make run` (mate check on the default device) and `make test`.
# Each sets up the virtualenv first when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test setup bench

run: $(VENV)/.installed
	$(PY) -m mate check

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q

setup $(VENV)/.installed:
	bash ci/setup.sh $(VENV)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_combine.py
