# Two commands do all set-up on a fresh machine:
#   make run    # installs into .venv, then a small dummy OPT across gpu/cpu/disk tiers
#   make test   # installs into .venv, then the test suite
# TORCH pins the wheel installed first: on a CPU-only machine with a local CPU wheel it
# is taken from there; elsewhere pip takes PyPI's default (CUDA) build of that version.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flexgen-installed

.PHONY: install run test lint bench gpu-suite clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m flexgen --model opt-125m --dummy --percent 40 30 40 30 40 30 \
		--gpu-batch-size 4 --num-gpu-batches 2 --prompt-len 64 --gen-len 16 --offload-dir ./offload

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ruff check flexgen tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_vs_hf.py

# One call on a GPU machine: OK/FAIL per check, figures in gpu_suite.json (see README).
gpu-suite:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_suite.py --out gpu_suite.json

clean:
	$(PY) -m flexgen clean --offload-dir ./offload || true
	rm -rf offload .pytest_cache
