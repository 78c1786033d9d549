# Everything a user or CI runs. Each target creates .venv and installs Anycast first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test lint format clean bench bench-failover chaos

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/anycast demo $(ARGS)

test: $(STAMP)
	command -v haproxy >/dev/null || (apt-get update -qq && apt-get install -y -qq haproxy)
	$(BIN)/pytest $(PYTEST_ARGS)

# Serving benchmark (bench/results/serving.md); BENCH_WARMUP, BENCH_DURATION, BENCH_SYSTEMS.
bench: $(STAMP)
	$(BIN)/python bench/serving.py $(ARGS)

# Failover benchmark (bench/results/failover.md): lose a region's replicas under load.
bench-failover: $(STAMP)
	$(BIN)/python bench/failover.py $(ARGS)

# Fault suite: bounded load through a local cluster while faults are injected, then a soak.
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check src tests examples
	$(BIN)/ruff check src tests examples
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests examples
	$(BIN)/ruff check --fix src tests examples

clean:
	rm -rf $(VENV) .anycast dist .pytest_cache .mypy_cache .ruff_cache
