# dtrain: `make demo` shows the whole story, `make test` runs the suite.
# Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPROC ?= 2

.PHONY: install demo lint test test-fast soak bench chaos gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

demo: install
	$(BIN)/python examples/demo.py --nproc $(NPROC)

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -n 2 -q -m "not soak"

test-fast: install
	$(BIN)/python -m pytest -n 2 -q -m "not slow and not soak"

soak: install
	$(BIN)/python -m pytest -n 2 -q -m soak

bench: install
	$(BIN)/python bench/run.py
	$(BIN)/python -m bench.fsdp

CHAOS_ARGS ?=

chaos: install
	$(BIN)/python -m chaos.run $(CHAOS_ARGS)

# The CUDA path on one GPU (exit 2 without one): GPT kill/resume, CPU<->CUDA snapshots, a 4 GB snapshot's cost.
gpu-check:
	launch/ci/gpu-check.sh

clean:
	rm -rf $(VENV) build *.egg-info
