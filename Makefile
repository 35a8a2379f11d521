# Two entry points a fresh clone needs (see README): `make suite` and `make test`.
# Each creates .venv and installs the package (with the dev extra) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: suite results demo test test-slow speed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

suite: $(STAMP)
	$(PY) -m experiments.suite

# experiments/RESULTS.md: the reduced-size suite on three tasks for the models of issue 7
# (about an hour on 2 quiet cores), then the report. The 3:1 hybrid has 4 layers, the others 2.
RESULT_TASKS := selective_copying mqar induction_heads
RESULT_MODELS := attention s4d s5 lru mamba mamba2 gla gated_deltanet mlstm
results: $(STAMP)
	for task in $(RESULT_TASKS); do \
	  $(PY) -m experiments.suite --quiet --task $$task --out runs $(foreach m,$(RESULT_MODELS),--model $(m)) && \
	  $(PY) -m experiments.suite --quiet --task $$task --out runs --model 'gated_deltanet*3,attention' --set n_layers=4 \
	  || exit 1; done
	$(PY) -m experiments.report --runs runs --out experiments/RESULTS.md

demo: $(STAMP)
	$(PY) -m experiments.demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n 2

speed: $(STAMP)
	$(PY) -m experiments.speed
