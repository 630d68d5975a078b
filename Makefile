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

.PHONY: venv test demo sweep bench clean-venv

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

clean-venv:
	rm -rf $(VENV)
