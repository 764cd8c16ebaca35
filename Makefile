# `make test` / `make demo` need only python3 (>= 3.10): they create .venv and install into it.
#   make demo       the runtime install (`pip install -e .`: no torch, tensorflow-datasets, libtpu)
#   make test-fast  the unit tier (no slow, multiprocess, tpu_aot or torch tests)
#   make test       every tier, with the 15 slowest tests listed (what CI runs)
#   make lint       ruff lint + format check, and the import-layer contract (.importlinter)
#   make format     ruff's fixes and formatting, in place (tools/lint_fix.sh)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN = $(dir $(PY))
RUNTIME_STAMP := $(VENV)/.installed-runtime
TEST_STAMP := $(VENV)/.installed-test
DEMO_ARGS ?=
PYTEST_ARGS ?=
TEST_ENV := JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1
LINT_PATHS := nextstep_jax tests benchmarks configs launch tools setup.py
FAST_TIER := not slow and not multiprocess and not tpu_aot and not torch

.PHONY: test test-fast demo lint format

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever setup.py changes. The test install includes the runtime, so it stamps both.
$(RUNTIME_STAMP): setup.py | $(PY)
	$(PY) -m pip install -e .
	touch $(RUNTIME_STAMP)

$(TEST_STAMP): setup.py | $(PY)
	$(PY) -m pip install -e '.[test,parity,tfds,tpu-aot]'
	touch $(TEST_STAMP) $(RUNTIME_STAMP)

test: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS) tests

test-fast: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --durations=10 -m '$(FAST_TIER)' $(PYTEST_ARGS) tests

lint: $(TEST_STAMP)
	$(BIN)ruff check $(LINT_PATHS)
	$(BIN)ruff format --check $(LINT_PATHS)
	if [ -f .importlinter ]; then $(BIN)lint-imports; fi

format: $(TEST_STAMP)
	PATH=$(abspath $(BIN)):$$PATH PYTHON=$(PY) tools/lint_fix.sh

demo: $(RUNTIME_STAMP)
	$(PY) -m nextstep_jax.cli.demo $(DEMO_ARGS)
