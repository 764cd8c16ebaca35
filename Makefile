# `make test` / `make demo` need only python3 (>= 3.10): they create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ARGS ?=

.PHONY: test demo

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever setup.py changes.
$(STAMP): setup.py | $(PY)
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 $(PY) -m pytest -q -n 2 --import-mode=importlib tests

demo: $(STAMP)
	$(PY) -m nextstep_jax.cli.demo $(DEMO_ARGS)
