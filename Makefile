# Two commands do all set-up on a fresh machine:
#   make run    # installs into .venv, then a small dummy OPT across gpu/cpu/disk tiers
#   make test   # installs into .venv, then the test suite
# TORCH pins the wheel installed first: on a CPU-only machine with a local CPU wheel it
# is taken from there; elsewhere pip takes PyPI's default (CUDA) build of that version.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
# Extras installed for `make test`: the HELM tests need `helm` (crfm-helm); EXTRAS=test skips it.
EXTRAS ?= test,helm
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flexgen-installed

.PHONY: install run test lint bench compare gpu-suite gpu-compare fetch-original clean

# crfm-helm would otherwise replace the pinned torch: the extras install under a constraint that
# holds it. It also pulls torchvision (a CUDA build) that breaks transformers' model imports on a
# CPU-only torch; HELM needs torchvision only for image metrics, so it goes when it breaks them.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[$(EXTRAS)]"
	$(PY) -c "from transformers import OPTForCausalLM" 2>/dev/null || $(PY) -m pip uninstall -y -q torchvision
	$(PY) -c "from transformers import OPTForCausalLM"
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

# flexgen beside transformers / Accelerate on one workload (benchmarks/compare.py --list), each
# system in its own memory cgroup; RECORD=--record appends the table to benchmarks/RESULTS.md.
WORKLOAD ?= smoke
compare: $(STAMP)
	$(PY) benchmarks/compare.py --workload $(WORKLOAD) $(RECORD)

# One call on a GPU machine: OK/FAIL per check, figures in gpu_suite.json (see README).
gpu-suite:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_suite.py --out gpu_suite.json

# flexgen vs Accelerate vs the original FlexGen 0.1.8 under a 16 GB GPU cap, one device call per
# model (MODEL=opt-6.7b|opt-30b|opt-175b); the original's wheels come from `make fetch-original`.
MODEL    ?= opt-30b
ORIGINAL ?= shared/original
fetch-original:
	$(PYTHON) benchmarks/gpu_compare.py --fetch-original $(ORIGINAL)

gpu-compare:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_compare.py --model $(MODEL) --original $(ORIGINAL) \
		--out gpu_compare_$(MODEL).json --record

clean:
	$(PY) -m flexgen clean --offload-dir ./offload || true
	rm -rf offload .pytest_cache
