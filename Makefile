# Two entry points a fresh clone needs (see README): `make suite` and `make test`.
# Each creates .venv and installs the package (with the dev extra) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: suite demo test test-slow speed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

suite: $(STAMP)
	$(PY) -m experiments.suite

demo: $(STAMP)
	$(PY) -m experiments.demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n 2

speed: $(STAMP)
	$(PY) -m experiments.speed
