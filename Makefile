# The two README commands: `make demo` (main job) and `make test` (test suite).
# Both depend on `make setup`, which is idempotent: it (re)installs only when
# pyproject.toml/setup.py change or the virtual environment is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CUDA build of torch (from the machine's local wheel cache) so the CUDA extension can be compiled
# even on CPU-only machines; override with `make setup TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.14.1
STAMP := $(VENV)/.pskernels-installed
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench info clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,build,demo,train]"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not interpreter" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/pskernels demo

bench: setup
	$(PY) -m pytest -q bench --benchmark-only

info: setup
	$(VENV)/bin/pskernels info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
